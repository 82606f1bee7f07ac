"""The launch pieces that need no Slurm: the watchdog, the stop signals, the sbatch scripts' shape, submit's option
parsing and early errors, and the writable-directory check. tests/test_slurm.py runs them all on a real Slurm."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm2clip_scale.cli import main
from llm2clip_scale.config import load_config
from llm2clip_scale.config.load import ConfigError, validate
from llm2clip_scale.distributed.watchdog import Watchdog
from llm2clip_scale.launch import preemption
from llm2clip_scale.launch.submit import parse_time_minutes
from llm2clip_scale.train import loop
from tests.conftest import REPO, load_script, tiny_overrides

JOB_SCRIPTS = ["llm2clip_cc", "proclip_inherit", "stage2_vit_e", "stage2_so400m", "proclip_stage2", "embed_captions"]


def _stalls(watchdog: Watchdog, seconds: float) -> list[str]:
    seen: list[str] = []
    watchdog._on_stall = seen.append
    with watchdog.phase("waiting for the data loader", step=7):
        time.sleep(seconds)
    watchdog.close()
    return seen


def test_watchdog_names_rank_phase_step_and_the_frame_it_is_stuck_in() -> None:
    seen = _stalls(Watchdog(0.3, rank=5, poll_s=0.05), 1.0)
    assert len(seen) == 1
    assert "rank 5 stalled" in seen[0] and "waiting for the data loader at step 7" in seen[0]
    assert "innermost frame: _stalls" in seen[0]  # time.sleep is C: the Python frame that called it is named


def test_watchdog_stays_quiet_when_phases_finish_in_time() -> None:
    assert _stalls(Watchdog(1.0, rank=0, poll_s=0.05), 0.2) == []
    assert _stalls(Watchdog(0, rank=0), 0.1) == []  # 0 turns it off (no thread at all)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    loop._STOP.clear()


def test_time_limit_signal_sets_the_stop_flag_and_asks_for_a_requeue(restore_signals) -> None:
    preemption.install_stop_handlers()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)  # a second one only sets the flag again
    assert loop._STOP.is_set() and preemption.requeue_requested()
    assert preemption.received_signals() == ["SIGUSR1", "SIGUSR1"]


def test_sigterm_saves_and_stops_without_a_requeue_of_its_own(restore_signals) -> None:
    preemption.install_stop_handlers(requeue_signals=(signal.SIGUSR2,))
    os.kill(os.getpid(), signal.SIGTERM)
    assert loop._STOP.is_set() and not preemption.requeue_requested()


def test_requeue_outside_slurm_is_refused_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preemption.requeue_job() is False


@pytest.mark.parametrize("script", JOB_SCRIPTS)
def test_job_scripts_parse_and_carry_the_headers_a_cluster_needs(script: str) -> None:
    path = REPO / "slurm" / f"{script}.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    for needed in ("nodes", "gpus-per-node", "cpus-per-task", "time", "exclusive", "mem", "requeue", "open-mode",
                   "output"):
        assert needed in headers, f"{script}.sh lacks #SBATCH --{needed}"
    assert headers["open-mode"] == "append" and headers["mem"] == "0"
    if script != "embed_captions":  # embedding resumes by shard; training saves ahead of the limit
        assert headers.get("signal", "").startswith("USR1@")
    default_config = re.search(r"\$\{CONFIG:-([^}]+)\}", text).group(1)
    load_config(REPO / default_config)  # the default config exists and loads (its data lives on the cluster)


def test_launch_derives_ranks_cores_and_port_from_the_allocation() -> None:
    text = (REPO / "slurm" / "launch.sh").read_text()
    assert "SRUN_CPUS_PER_TASK" in text and "--kill-on-bad-exit=1" in text and "SLURM_JOB_ID % 20000" in text
    env_sh = (REPO / "slurm" / "env.sh").read_text()
    for variable in ("NCCL_DEBUG", "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS"):
        assert re.search(rf"export {variable}=\$\{{{variable}:-", env_sh), f"{variable} not overridable"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:00", 30), ("02:30:00", 150), ("1-00:00:00", 1440),
                                            ("2-12", 3600), ("00:00:30", 1)])
def test_submit_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


def test_submit_rejects_a_bad_config_before_submitting(capsys: pytest.CaptureFixture) -> None:
    status = main(["submit", str(REPO / "configs" / "tiny_cpu.yaml"), "--gpus-per-node", "3", "train.steps=5",
                   "train.warmup_steps=1"])
    assert status == 2
    assert "micro_batch" in capsys.readouterr().err  # 64 is no multiple of 32 x 3 ranks


def test_shard_slices_cover_every_shard_once() -> None:
    shard_slice = load_script("embed_captions").shard_slice
    urls = [f"s{i}" for i in range(10)]
    parts = [shard_slice(urls, f"{i}/4") for i in range(4)]
    assert sum(parts, []) == urls and [len(p) for p in parts] == [2, 3, 2, 3]
    with pytest.raises(ValueError, match="I must lie"):
        shard_slice(urls, "4/4")


def test_unwritable_checkpoint_dir_fails_before_the_first_step(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write to"):
        loop.check_writable(str(tmp_path / "ok"), str(blocker / "ckpt"))


def test_timeouts_are_validated() -> None:
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml",
                      ["parallel.collective_timeout_minutes=0", "parallel.watchdog_seconds=-1"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2)
    assert "collective_timeout_minutes" in str(err.value) and "watchdog_seconds" in str(err.value)


def test_submit_local_runs_the_job_with_submitits_local_executor(tiny_data: Path, tmp_path: Path) -> None:
    """``submit --local``: submitit's local executor starts 2 ranks here; rank 0's result comes back with --wait."""
    out = subprocess.run(
        [sys.executable, "-m", "llm2clip_scale", "submit", "configs/tiny_cpu.yaml", "--local", "--gpus-per-node",
         "2", "--cpus-per-task", "1", "--time", "10", "--folder", str(tmp_path / "submitit"), "--wait",
         *tiny_overrides(tiny_data, tmp_path, 2)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["steps"] == 2 and result["checkpoint"] == str(tmp_path / "ckpt" / "step2")
    assert json.loads((tmp_path / "logs" / "result.json").read_text()) == result
