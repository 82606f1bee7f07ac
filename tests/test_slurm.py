"""The sbatch scripts and ``llm2clip-scale submit`` on a real Slurm (the local one of slurm/local/start.sh, which
``make test`` starts): a plain run, preemption -> save -> requeue -> exact resume through both, and a planted stall
that the watchdog turns into a failed job. Every run is the tiny 2-rank stage 2 of the other tests, shrunk through
sbatch's own options as a user would; the reference for "exact" is the uninterrupted sbatch run of the same config.

Without a reachable Slurm these tests skip, loudly; with LLM2CLIP_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from llm2clip_scale.data.sidecar import decode_embedding
from tests.conftest import REPO, loss_records, tiny_overrides

STEPS = 16  # the signal at step 5 must land before the last step, with room for a slow scancel
SIGNAL_AT_STEP = 5
SHRINK = ["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=2"]  # the one-node CPU allocation


def _slurm_up() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found (start the local Slurm with slurm/local/start.sh, as root)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not any(s in probe.stdout for s in ("idle", "mixed", "allocated")):
        return f"no Slurm node is up (sinfo: {probe.stdout.strip() or probe.stderr.strip()})"
    return None


_WHY_NOT = _slurm_up()
if _WHY_NOT and os.environ.get("LLM2CLIP_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"LLM2CLIP_REQUIRE_SLURM=1 but Slurm is not usable: {_WHY_NOT}")
if _WHY_NOT:
    print(f"\n*** SLURM TESTS SKIPPED: {_WHY_NOT} ***", file=sys.stderr)
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"SLURM TESTS SKIPPED: {_WHY_NOT}")


def _env(**extra: str) -> dict:
    # PY: the interpreter running the tests (the repo's venv); CONFIG: the tiny config, as the script headers say.
    return {**os.environ, "PY": sys.executable, "CONFIG": "configs/tiny_cpu.yaml", **extra}


def _overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return tiny_overrides(data, run, STEPS, "logging.interval=1", "train.resume=auto", *extra)


def sbatch(script: str, log: Path, args: list[str], env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *SHRINK, f"--output={log}", f"slurm/{script}", *args],
                         cwd=REPO, env=env or _env(), capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def wait_for_job(job: str, log: Path, timeout: float = 600) -> str:
    """Wait until the job ends; a requeued job waiting out Slurm's requeue hold (BeginTime ~2 min ahead) is made
    eligible at once, which changes nothing but the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state == "PENDING" and int(job_field(job, "Restarts") or 0) > 0:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} still {job_field(job, 'JobState')} after {timeout} s; log:\n{_tail(log)}")


def _tail(log: Path, lines: int = 60) -> str:
    """The end of the job's log; for submitit's per-rank logs (``<job>_0_log.err``) the end of every rank's, since the
    rank that crashed is often not rank 0."""
    logs = sorted(log.parent.glob(log.name.replace("_0_log", "_*_log"))) if "_0_log" in log.name else [log]
    return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                     for path in logs if path.exists()) or "(no log)"


def wait_for_step(run: Path, step: int, job: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(dict(loss_records(run))) >= step:
            return
        if job_field(job, "JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job} ended before step {step}; log:\n{_tail(log)}")
        time.sleep(0.2)
    pytest.fail(f"job {job} did not reach step {step} in {timeout} s; log:\n{_tail(log)}")


@pytest.fixture(scope="module")
def reference_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sbatch slurm/stage2_vit_e.sh`` with the tiny config, uninterrupted."""
    run = tmp_path_factory.mktemp("slurm_reference")
    log = run / "job.out"
    job = sbatch("stage2_vit_e.sh", log, _overrides(tiny_data, run))
    state = wait_for_job(job, log)
    assert state == "COMPLETED", f"reference job {job} ended {state}; log:\n{_tail(log)}"
    return run


def test_sbatch_stage2_runs_to_result(reference_run: Path) -> None:
    result = json.loads((reference_run / "logs" / "result.json").read_text())
    assert result["steps"] == STEPS and result["checkpoint"].endswith(f"step{STEPS}")
    assert "stopped_early" not in result and "resumed_from" not in result
    log = (reference_run / "job.out").read_text()
    assert "1 node(s) x 2 ranks" in log  # the shrunk allocation: 2 ranks from --gpus-per-node=2
    assert sorted(dict(loss_records(reference_run))) == list(range(1, STEPS + 1))


def test_sbatch_time_limit_signal_saves_requeues_and_resumes_exactly(tiny_data: Path, reference_run: Path,
                                                                     tmp_path: Path) -> None:
    """USR1 (the scripts' warning before the time limit) twice: save, rank 0 requeues, the job resumes by itself."""
    log = tmp_path / "job.out"
    job = sbatch("stage2_vit_e.sh", log, _overrides(tiny_data, tmp_path))
    wait_for_step(tmp_path, SIGNAL_AT_STEP, job, log)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # A second signal right behind the first, while the ranks finish the step and save: it only sets the flag
    # again. (Once the requeue has begun Slurm refuses signals and scancel retries for minutes: hence the timeout.)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, timeout=2)
    state = wait_for_job(job, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}; log:\n{_tail(log)}"
    assert job_field(job, "Restarts") == "1", text
    assert "stop requested: saved step" in text and f"requeueing Slurm job {job}" in text, text
    assert "launch: job" in text and "(restart 1)" in text, text
    _assert_same_trajectory(tmp_path, reference_run)


def test_submitit_preemption_requeues_and_resumes_exactly(tiny_data: Path, reference_run: Path,
                                                          tmp_path: Path) -> None:
    """``llm2clip-scale submit``: submitit's own signal (USR2) -> collective save -> submitit's requeue -> resume."""
    folder = tmp_path / "submitit"
    submit = subprocess.run(
        [sys.executable, "-m", "llm2clip_scale", "submit", "configs/tiny_cpu.yaml", "--nodes", "1",
         "--gpus-per-node", "2", "--cpus-per-task", "1", "--no-exclusive", "--time", "30",
         "--folder", str(folder), *_overrides(tiny_data, tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.split("submitted 1 job(s): ")[1].split()[0]
    log = folder / f"{job}_0_log.err"
    wait_for_step(tmp_path, SIGNAL_AT_STEP, job, log)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = wait_for_job(job, log)
    assert state == "COMPLETED", f"job {job} ended {state}; log:\n{_tail(log)}"
    assert job_field(job, "Restarts") == "1"
    _assert_same_trajectory(tmp_path, reference_run)


def test_watchdog_ends_a_job_with_a_stalled_rank(tiny_data: Path, tmp_path: Path) -> None:
    """Rank 1 sleeps inside step 3 (tests/stall/sitecustomize.py); the watchdog names it and the job fails."""
    log = tmp_path / "job.out"
    stall = REPO / "tests" / "stall"
    env = _env(PYTHONPATH=f"{stall}:{REPO}", LLM2CLIP_TEST_STALL="rank=1,step=3,seconds=600")
    started = time.monotonic()
    job = sbatch("stage2_vit_e.sh", log, _overrides(tiny_data, tmp_path, "parallel.watchdog_seconds=10"), env)
    state = wait_for_job(job, log, timeout=300)
    text = log.read_text()
    assert state == "FAILED", f"job {job} ended {state}; log:\n{_tail(log)}"
    assert "watchdog: rank" in text and "at step 3" in text, text
    # Whichever rank's watchdog fires first, the stalled rank's frame or its peer's wait is named.
    assert "innermost frame:" in text, text
    assert time.monotonic() - started < 240  # the planted sleep is 600 s: the job did not wait it out


def test_submitit_embedding_array_covers_every_shard_once(tiny_data: Path, tiny_sidecars: Path,
                                                          tmp_path: Path) -> None:
    """``submit --embed-captions --array 2``: two array tasks of 2 ranks each embed their halves of the shards; the
    union equals the in-process embedding of the same shards (the default bf16 sidecars vs fp32: one bf16 rounding,
    at most 2^-8 relative)."""
    out = tmp_path / "emb"
    submit = subprocess.run(
        [sys.executable, "-m", "llm2clip_scale", "submit", "configs/tiny_cpu.yaml", "--gpus-per-node", "2",
         "--cpus-per-task", "1", "--no-exclusive", "--time", "20", "--folder", str(tmp_path / "submitit"),
         "--embed-captions", f"{tiny_data}/train-{{000000..000003}}.tar", "--out", str(out), "--array", "2",
         "--wait", f"model.llm.tokenizer={tiny_data}/tokenizer"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert submit.stdout.splitlines()[-2:] == ["0", "0"]  # --wait prints each array task's return value
    written = sorted(path.name for path in out.glob("*.tar"))
    assert written == [f"train-{i:06d}.tar" for i in range(4)]
    for name in written:
        got, expected = _vectors(out / name), _vectors(tiny_sidecars / name)
        assert got.keys() == expected.keys() and got
        for key, vector in got.items():
            assert np.allclose(decode_embedding(vector), expected[key], rtol=4e-3, atol=4e-3), key


def _vectors(sidecar: Path) -> dict[str, np.ndarray]:
    with tarfile.open(sidecar) as tar:
        return {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".npy")}


def _assert_same_trajectory(run: Path, reference: Path) -> None:
    losses, expected = dict(loss_records(run)), dict(loss_records(reference))
    assert sorted(losses) == list(range(1, STEPS + 1)), "a step is missing or repeated across the requeue"
    # Bit-exact on CPU, as the in-process resume tests: same data position, RNG, optimizer and schedule.
    assert losses == expected
    result = json.loads((run / "logs" / "result.json").read_text())
    resumed_at = int(Path(result["resumed_from"]).name.removeprefix("step"))
    assert result["steps"] == STEPS and SIGNAL_AT_STEP <= resumed_at < STEPS
