"""The launch pieces that need no Slurm: the watchdog, the stop signals, the sbatch scripts' shape and the srun lines
they produce (run with stand-in cluster tools), the shipped configs at their jobs' world sizes, submit's option
parsing and early errors, and the writable-directory check. tests/test_slurm.py runs them all on a real Slurm."""

from __future__ import annotations

import json
import operator
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import braceexpand
import pytest

from llm2clip_scale.cli import main
from llm2clip_scale.config import load, load_config
from llm2clip_scale.config.load import ConfigError, expand_shards, validate
from llm2clip_scale.distributed.watchdog import Watchdog
from llm2clip_scale.launch import preemption
from llm2clip_scale.launch.submit import parse_time_minutes
from llm2clip_scale.train import loop
from tests.conftest import REPO, tiny_overrides

JOB_SCRIPTS = ["llm2clip_cc", "proclip_inherit", "stage2_vit_e", "stage2_so400m", "proclip_stage2", "embed_captions"]
# Ranks of each job as the configs' layout notes state them (nodes x GPUs per node; slurm/launch.sh starts one rank
# per GPU). The sbatch headers must agree, and each config must validate at this world size.
JOB_RANKS = {"llm2clip_cc": 8, "proclip_inherit": 8, "stage2_vit_e": 128, "stage2_so400m": 64, "proclip_stage2": 32,
             "embed_captions": 8}


def sbatch_headers(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of slurm/<script>.sh (a flag without a value maps to "")."""
    text = (REPO / "slurm" / f"{script}.sh").read_text()
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))


def sbatch_ranks(headers: dict[str, str]) -> tuple[int, int]:
    """(nodes, ranks per node) of an allocation: one rank per GPU (``--gpus-per-node`` may be ``type:N``)."""
    return int(headers["nodes"]), int(headers["gpus-per-node"].rsplit(":", 1)[-1])


def default_config(script: str) -> str:
    return re.search(r"\$\{CONFIG:-([^}]+)\}", (REPO / "slurm" / f"{script}.sh").read_text()).group(1)


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
    subprocess.run(["bash", "-n", str(REPO / "slurm" / f"{script}.sh")], check=True)
    headers = sbatch_headers(script)
    for needed in ("nodes", "gpus-per-node", "cpus-per-task", "time", "exclusive", "mem", "requeue", "open-mode",
                   "output"):
        assert needed in headers, f"{script}.sh lacks #SBATCH --{needed}"
    assert headers["open-mode"] == "append" and headers["mem"] == "0"
    if script != "embed_captions":  # embedding resumes by shard; training saves ahead of the limit
        assert headers.get("signal", "").startswith("USR1@")
    load_config(REPO / default_config(script))  # the default config exists and loads (its data lives on the cluster)


# ------------------------------------------------------------------------------ the jobs at their own scale

# Config fields naming files or directories that live on the cluster (or are written by an earlier job).
PATH_FIELDS = {
    "data.train_shards", "data.eval_shards", "data.train_embedding_shards", "data.eval_embedding_shards",
    "stage1.eval_pairs", "model.llm.tokenizer", "model.llm.hf_checkpoint", "model.llm.lora_init",
    "model.vision.pretrained_path", "model.adapter_init", "model.vision_head_init", "proclip.teacher_text",
}
SHARD_FIELDS = {"data.train_shards", "data.eval_shards", "data.train_embedding_shards", "data.eval_embedding_shards",
                "stage1.eval_pairs"}


@pytest.fixture
def first_shard_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate() stats every shard of a pattern: 2 s for the 100,000 of a cluster config, all absent here. Only the
    first is checked in these tests, which are about the layout rules (the file rules have tests/test_config.py)."""
    def first_missing(field: str, pattern: str, fix: str) -> list[str]:
        first = next(iter(braceexpand.braceexpand(pattern.split("::")[0])))
        return [] if Path(first).is_file() else [f"{field}: missing, first {first}; {fix}"]

    monkeypatch.setattr(load, "_missing_files", first_missing)


def _absent_here(cfg, field: str) -> bool:
    """Whether the path ``field`` names (the first shard of a pattern) is absent from this machine."""
    value = operator.attrgetter(field)(cfg)
    if field in SHARD_FIELDS:
        return not Path(next(iter(expand_shards(value)))).is_file()
    if field == "proclip.teacher_text":
        return not (Path(value) / "config.json").is_file()
    return not Path(value).exists()


def split_problems(cfg, world_size: int) -> tuple[list[str], list[str]]:
    """validate()'s problems as (data absent from this machine, every other problem)."""
    try:
        validate(cfg, world_size)
    except ConfigError as err:
        problems = str(err).split("\n  - ")[1:]
    else:
        return [], []
    absent = [p for p in problems if p.split(":")[0] in PATH_FIELDS and _absent_here(cfg, p.split(":")[0])]
    return absent, [p for p in problems if p not in absent]


@pytest.mark.parametrize("script", JOB_SCRIPTS)
@pytest.mark.usefixtures("first_shard_only")
def test_job_configs_validate_at_their_sbatch_world_size(script: str) -> None:
    """The allocation an sbatch header asks for is the one its config's layout is built for: validate() at that
    world size finds no problem but the cluster's data missing here (each one checked to be absent)."""
    nodes, per_node = sbatch_ranks(sbatch_headers(script))
    assert nodes * per_node == JOB_RANKS[script], f"{script}.sh asks for {nodes} x {per_node} ranks"
    cfg = load_config(REPO / default_config(script))
    absent, problems = split_problems(cfg, nodes * per_node)
    if script == "embed_captions":
        # Offline embedding runs only the frozen LLM, at PP 1 (data_prep/embed_captions.py): its layout is all that
        # must hold at this world size; the training rules hold at the training job's own (stage2_vit_e above).
        assert cfg.parallel.pipeline_parallel == 1
        problems = [p for p in problems if p.startswith(("parallel", "model.llm"))]
    assert problems == [], f"{default_config(script)} at {nodes * per_node} ranks (data absent here: {absent})"


@pytest.mark.usefixtures("first_shard_only")
def test_cluster_data_problems_are_told_apart_from_layout_problems() -> None:
    cfg = load_config(REPO / "configs" / "stage2_vit_e.yaml", ["train.global_batch=8000"])
    absent, problems = split_problems(cfg, 128)
    assert [p.split(":")[0] for p in problems] == ["train.global_batch"]
    assert {p.split(":")[0] for p in absent} >= {"data.train_shards", "model.llm.tokenizer"}


STANDIN = """#!/bin/bash
# Stand-in for a cluster tool: records its argv, environment and working directory, numbered by call.
tool=$(basename "$0")
n=$(ls "$STANDIN_DIR" | wc -l)
printf '%s\\0' "$@" > "$STANDIN_DIR/$n.$tool.argv"
env -0 > "$STANDIN_DIR/$n.$tool.env"
pwd > "$STANDIN_DIR/$n.$tool.cwd"
case "$tool" in
    scontrol)
        [ "$1 $2" = "show hostnames" ] || exit 97
        printf 'gpu-c017\\n%s' "$(seq -f 'gpu-a%05g' 1 $((SLURM_JOB_NUM_NODES - 1)))"
        echo ;;
    srun)
        case " $* " in *" validate "*) exit "${STANDIN_VALIDATE_RC:-0}";; esac ;;
    *) exit 97 ;;  # no other cluster tool may be called
esac
"""
CLUSTER_TOOLS = ("srun", "scontrol", "sbatch", "scancel", "squeue", "sinfo", "nvidia-smi", "torchrun")
JOB_ID = 4242421
SRUN_VALUE_OPTIONS = {"--nodes", "--ntasks", "--ntasks-per-node", "--cpus-per-task"}


def run_sbatch_script(script: str, tmp_path: Path, args: list[str], **extra_env: str):
    """``bash`` a spooled copy of slurm/<script>.sh in the environment sbatch gives a batch step of its header's
    allocation, with stand-ins for the cluster tools first on PATH. Returns (process, [(tool, argv, env, cwd)])."""
    headers = sbatch_headers(script)
    nodes, per_node = sbatch_ranks(headers)
    bin_dir, records, spool = tmp_path / "bin", tmp_path / "records", tmp_path / "spool"
    for directory in (bin_dir, records, spool):
        directory.mkdir(parents=True)
    for tool in CLUSTER_TOOLS:
        (bin_dir / tool).write_text(STANDIN)
        (bin_dir / tool).chmod(0o755)
    (spool / "slurm_script").write_text((REPO / "slurm" / f"{script}.sh").read_text())
    tasks_per_node, cpus_per_task = int(headers["ntasks-per-node"]), int(headers["cpus-per-task"])
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STANDIN_DIR": str(records),
        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOBID": str(JOB_ID),
        "SLURM_JOB_NAME": headers["job-name"], "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu-c017,gpu-a[001-{nodes - 1:03d}]" if nodes > 1 else "gpu-c017",
        "SLURM_GPUS_PER_NODE": headers["gpus-per-node"], "SLURM_CPUS_PER_TASK": str(cpus_per_task),
        "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_CPUS_ON_NODE": str(cpus_per_task * tasks_per_node), "SLURM_NODEID": "0", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", **extra_env,
    }
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    calls = []
    for argv in sorted(records.glob("*.argv"), key=lambda path: int(path.name.split(".")[0])):
        stem = str(argv)[: -len(".argv")]
        environ = dict(item.split("=", 1) for item in Path(stem + ".env").read_text().split("\0") if "=" in item)
        calls.append((argv.name.split(".")[1], argv.read_text().split("\0")[:-1], environ,
                      Path(stem + ".cwd").read_text().strip()))
    return proc, calls


def srun_parts(argv: list[str], program: str) -> tuple[dict[str, str], list[str]]:
    """srun's options (``--opt value`` and ``--opt=value``) and the program with its arguments."""
    options: dict[str, str] = {}
    rest = list(argv)
    while rest and rest[0] != program:
        option = rest.pop(0)
        assert option.startswith("--"), f"srun argument {option!r} before the program {program}"
        key, _, value = option.partition("=")
        options[key] = rest.pop(0) if key in SRUN_VALUE_OPTIONS and not value else value
    assert rest, f"{program} not in {argv}"
    return options, rest


@pytest.mark.parametrize("script", JOB_SCRIPTS)
def test_job_scripts_start_one_rank_per_gpu_with_srun(script: str, tmp_path: Path) -> None:
    nodes, per_node = sbatch_ranks(sbatch_headers(script))
    config, extra = default_config(script), ["train.steps=7", "logging.interval=5"]
    array_env = {"SHARDS": "/datasets/x/train-{000000..000099}.tar", "OUT": "/datasets/x/emb",
                 "SLURM_ARRAY_JOB_ID": str(JOB_ID), "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "100"}
    proc, calls = run_sbatch_script(script, tmp_path, extra, NCCL_DEBUG="INFO",
                                    **(array_env if script == "embed_captions" else {}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    python = str(REPO / ".venv" / "bin" / "python")
    train = script != "embed_captions"
    assert [tool for tool, *_ in calls] == ["scontrol", *(["srun"] if train else []), "srun"], calls
    _, scontrol_argv, _, _ = calls[0]
    assert scontrol_argv == ["show", "hostnames", f"gpu-c017,gpu-a[001-{nodes - 1:03d}]" if nodes > 1 else "gpu-c017"]
    if train:  # first the config check, one task, at the job's world size
        _, argv, _, cwd = calls[1]
        options, program = srun_parts(argv, python)
        assert options == {"--nodes": "1", "--ntasks": "1"} and cwd == str(REPO)
        assert program == [python, "-m", "llm2clip_scale", "validate", config, "--world-size",
                           str(nodes * per_node), *extra]
    _, argv, env, cwd = calls[-1]
    options, program = srun_parts(argv, python)
    cores = 96 // per_node  # --cpus-per-task=96 of the batch step, shared by the ranks on the node
    assert options == {"--kill-on-bad-exit": "1", "--nodes": str(nodes), "--ntasks": str(nodes * per_node),
                       "--ntasks-per-node": str(per_node), "--cpus-per-task": str(cores), "--cpu-bind": "cores"}
    if train:
        assert program == [python, "-m", "llm2clip_scale", "train", config, *extra]
    else:
        assert program == [python, "data_prep/embed_captions.py", config, "--shards", array_env["SHARDS"], "--out",
                           array_env["OUT"], "--part", "3/100", *extra]
        assert (REPO / program[1]).is_file()
    assert (REPO / config).is_file() and cwd == str(REPO)
    port = str(20000 + JOB_ID % 20000)
    assert env["MASTER_ADDR"] == "gpu-c017" and env["MASTER_PORT"] == port  # scontrol's first host
    assert env["SRUN_CPUS_PER_TASK"] == str(cores)
    # slurm/env.sh: its defaults, except a value the user exported before sbatch (NCCL_DEBUG here).
    assert env["NCCL_DEBUG"] == "INFO" and env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert (f"launch: job {JOB_ID} (restart 0): {nodes} node(s) x {per_node} ranks, {cores} cores each, "
            f"rendezvous gpu-c017:{port}") in proc.stdout


def test_a_config_error_ends_the_job_before_the_ranks_start(tmp_path: Path) -> None:
    proc, calls = run_sbatch_script("stage2_vit_e", tmp_path, [], STANDIN_VALIDATE_RC="2")
    assert proc.returncode == 2
    assert [tool for tool, *_ in calls] == ["scontrol", "srun"] and "validate" in calls[1][1]


def test_typed_gpu_requests_and_cpu_partitions_set_the_ranks_per_node(tmp_path: Path) -> None:
    python = str(REPO / ".venv" / "bin" / "python")
    proc, calls = run_sbatch_script("stage2_so400m", tmp_path / "typed", [], SLURM_GPUS_PER_NODE="h100:8")
    assert proc.returncode == 0, proc.stderr
    assert srun_parts(calls[-1][1], python)[0]["--ntasks"] == "64"
    proc, calls = run_sbatch_script("stage2_so400m", tmp_path / "cpu", [], RANKS_PER_NODE="2", CPU_BIND="none",
                                    PY="/opt/venv/bin/python")
    assert proc.returncode == 0, proc.stderr
    options, program = srun_parts(calls[-1][1], "/opt/venv/bin/python")
    assert (options["--ntasks"], options["--ntasks-per-node"], options["--cpus-per-task"]) == ("16", "2", "48")
    assert options["--cpu-bind"] == "none" and program[:3] == ["/opt/venv/bin/python", "-m", "llm2clip_scale"]
    assert "--world-size" in calls[1][1] and calls[1][1][calls[1][1].index("--world-size") + 1] == "16"


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
    from llm2clip_scale.data.parts import part_slice as shard_slice
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


def test_master_addr_survives_the_hostname_list_of_a_large_allocation(tmp_path: Path) -> None:
    """16384 hostnames (180 kB) outgrow a pipe: reading only the first line of them must not kill the job."""
    proc, calls = run_sbatch_script("stage2_vit_e", tmp_path, [], SLURM_JOB_NUM_NODES="16384")
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    assert calls[-1][2]["MASTER_ADDR"] == "gpu-c017"
