"""Preemption and time limits: a signal only sets the loop's stop flag; the ranks agree on it at the next step
boundary (one collective), save one checkpoint together and return; then rank 0 requeues the job when the signal
asked for it, and the requeued job resumes from that checkpoint with ``train.resume=auto``.

Signals (the sbatch scripts send them; submitit uses its own, USR2 by default):

- ``SIGUSR1`` (``#SBATCH --signal=USR1@300``: five minutes before the time limit): save, stop, requeue.
- ``SIGTERM`` (preemption, ``scancel``, node drain): save and stop, no requeue of our own — Slurm requeues a preempted
  job itself, and a cancelled one should stay cancelled.

A second signal during the save only sets the flag again; the save goes on. A kill that cannot be caught (SIGKILL
after Slurm's ``KillWait``) can interrupt it, but never corrupts the newest complete checkpoint: a save is written
under a temporary name and becomes visible by one rename (checkpoint/layout.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterable

from llm2clip_scale.config.schema import Config
from llm2clip_scale.train.loop import request_stop

log = logging.getLogger("llm2clip_scale.launch")

_received: list[int] = []
_requeue_signals: set[int] = set()


def install_stop_handlers(requeue_signals: Iterable[int] = (signal.SIGUSR1,),
                          stop_signals: Iterable[int] = (signal.SIGTERM,)) -> None:
    """Route ``requeue_signals`` and ``stop_signals`` to the loop's stop flag (call once per process, main thread)."""
    _requeue_signals.clear()
    _requeue_signals.update(int(sig) for sig in requeue_signals)
    _received.clear()
    for sig in (*_requeue_signals, *stop_signals):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    # Only a flag and a list append: anything more (logging, I/O, collectives) is unsafe inside a signal handler.
    _received.append(signum)
    request_stop()


def received_signals() -> list[str]:
    return [signal.Signals(sig).name for sig in _received]


def requeue_requested() -> bool:
    return any(sig in _requeue_signals for sig in _received)


def slurm_job_id() -> str | None:
    # An array task is requeued by its own id (<array job>_<task>); SLURM_JOB_ID names the task's job record.
    return os.environ.get("SLURM_JOB_ID")


def requeue_job() -> bool:
    """``scontrol requeue`` this Slurm job (rank 0, after the collective save). False when not under Slurm."""
    job_id = slurm_job_id()
    if job_id is None:
        log.warning("stop signal %s asked for a requeue, but this is not a Slurm job: not requeued",
                    received_signals())
        return False
    log.warning("requeueing Slurm job %s after saving (signals received: %s)", job_id, received_signals())
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    return True


def restarted_by_slurm() -> bool:
    """True in a job that Slurm has requeued at least once (it must resume, never start over)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def train_with_preemption(cfg: Config, requeue_signals: Iterable[int] = (signal.SIGUSR1,),
                          requeue: Callable[[], object] = requeue_job) -> dict:
    """Train under ``cfg`` with the stop signals installed; after a signalled stop (a checkpoint saved by every rank)
    rank 0 calls ``requeue`` when a requeue signal was among them. The one entry of ``train`` (CLI) and ``submit``."""
    from llm2clip_scale.distributed.topology import shutdown
    from llm2clip_scale.train import run_training

    install_stop_handlers(requeue_signals)
    if restarted_by_slurm() and cfg.train.resume == "none":
        log.warning("requeued by Slurm: train.resume=none replaced by auto, so the job continues where it stopped")
        cfg.train.resume = "auto"
    result = run_training(cfg)
    shutdown()
    if result.get("stopped_early") and requeue_requested() and int(os.environ.get("RANK", "0")) == 0:
        requeue()
    return result
