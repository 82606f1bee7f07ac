"""The one training loop of every stage: set-up, steps, metric reduction, the non-finite policy, logging, periodic
eval, checkpoint timing, resume, the stop flag and ``result.json``. A stage is a small task object
(train/task.py) that this loop calls; nothing here knows towers, losses or data formats.

The path of one step, top to bottom: ``task.step(next(batches))`` (forward, backward, optimizer step) -> the
local loss averaged over ranks -> skip bookkeeping -> log -> commit a finished background save -> eval -> stop
agreement -> save. Resume restores model, optimizer, schedule, every rank's RNG and data position and this loop's
counters, so a resumed run repeats the uninterrupted run's steps exactly (bit-exact on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llm2clip_scale.checkpoint.layout import resolve_checkpoint
from llm2clip_scale.checkpoint.manager import CheckpointManager
from llm2clip_scale.checkpoint.rng import restore_rng
from llm2clip_scale.config.load import validate
from llm2clip_scale.config.schema import Config
from llm2clip_scale.distributed.topology import Topology, build_topology, init_distributed
from llm2clip_scale.distributed.watchdog import Watchdog
from llm2clip_scale.metrics.flops import StepFlops
from llm2clip_scale.metrics.logger import MetricLogger
from llm2clip_scale.train.task import TrainingTask

log = logging.getLogger("llm2clip_scale.train")

_STOP = threading.Event()


def request_stop() -> None:
    """Ask the loop to save and stop at the next step boundary. Safe from a signal handler: it only sets a flag;
    the ranks agree on it (one all-reduce per step) so that all of them save the same step together. A request
    made before the first step (while the run is being built) stops after the first step."""
    _STOP.set()


@dataclasses.dataclass
class LoopState:
    """The loop's own counters; saved in every rank's train state."""

    step: int = 0
    samples_seen: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0
    before_training: dict = dataclasses.field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: replicas start identical (tasks re-seed per model replica where they must differ)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _agree(values: list[float | torch.Tensor], device: torch.device, summed: int | None = None) -> list[float]:
    """``values`` (floats, or scalars still on the device) with the first ``summed`` (default: all) summed over the
    ranks: one all-reduce and one host read per step, whatever the number of values (tests/test_step_syncs.py)."""
    summed = len(values) if summed is None else summed
    # The host's floats travel in one copy that does not wait for the device (torch.tensor(..., device=cuda) would
    # synchronise); the device's scalars join them there, unread.
    host = torch.tensor([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values], dtype=torch.float64)
    host = host.to(device, non_blocking=True)
    packed = torch.cat([v.detach().reshape(1).to(device, torch.float64) if isinstance(v, torch.Tensor)
                        else host[i : i + 1] for i, v in enumerate(values)])
    dist.all_reduce(packed[:summed])  # a view: the values after it are read as they are
    return packed.tolist()


def _resume_path(cfg: Config, topo: Topology) -> Path | None:
    # Rank 0 decides and tells the others: ranks listing the directory at different moments could disagree.
    choice = [None]
    if topo.is_main:
        path = resolve_checkpoint(cfg.train.resume, cfg.checkpoint.dir)
        choice = [None if path is None else str(path)]
    dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def run(cfg: Config, task: TrainingTask) -> dict:
    """Train ``task`` under ``cfg``; returns the result dict on every rank (rank 0 also writes result.json)."""
    started = time.perf_counter()
    validate(cfg)
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    topo = build_topology(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    check_writable(cfg.checkpoint.dir, cfg.logging.dir)
    seed_everything(cfg.train.seed)
    task.build(cfg, topo)
    checkpoints = CheckpointManager(cfg, topo, task.name)
    loop = LoopState()
    rng = None
    resume = _resume_path(cfg, topo)
    if resume is not None:
        restored = checkpoints.load(resume, task.state(), task.data_key())
        task.load_state(restored.shared, restored.task_rank)
        loop = LoopState(**restored.loop)
        rng = restored.rng
        log.info("resumed from %s at step %d (%d samples seen)", resume, loop.step, loop.samples_seen)
    else:
        loop.before_training = task.before_training()
    logger = MetricLogger(cfg.logging, cfg.train.steps, topo.is_main, run_name=task.name, start_step=loop.step)
    if rng is not None:
        restore_rng(rng)  # last: building and loading drew from the generators
    train_start = time.perf_counter()
    watchdog = Watchdog(cfg.parallel.watchdog_seconds, topo.rank)
    try:
        stopped = _train(cfg, task, topo, loop, checkpoints, logger, watchdog)
    finally:
        watchdog.close()
        _STOP.clear()  # not at the start: a signal that arrived while the run was being built must still stop it
    checkpoints.close()
    train_seconds = time.perf_counter() - train_start

    result: dict = {"stage": task.name, "steps": loop.step, "first_loss": _round(loop.first_loss),
                    "final_loss": _round(loop.last_loss), "skipped_steps": loop.skipped_steps,
                    **loop.before_training}
    if resume is not None:
        result["resumed_from"] = str(resume)
    if checkpoints.last_committed is not None:
        result["checkpoint"] = str(checkpoints.last_committed)
    if stopped:
        result["stopped_early"] = True
    else:
        metrics = task.evaluate()
        if metrics is not None:
            logger.log_eval(loop.step, metrics)
            result.update(metrics)
        result.update(task.finish())
    result["skipped_samples"] = task.skipped_samples()
    result["train_seconds"] = round(train_seconds, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    logger.close()
    if topo.is_main:
        Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.logging.dir) / "result.json").write_text(json.dumps(result, indent=2))
    return result


def check_writable(*directories: str) -> None:
    """Create each directory and write a probe file from every rank now, not at the first save hours later."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for directory in directories:
        probe = Path(directory) / f".write-probe-rank{rank}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"rank {rank} cannot write to {directory!r} ({err}); point checkpoint.dir and "
                                  "logging.dir at a writable (shared) file system") from err


def _train(cfg: Config, task: TrainingTask, topo: Topology, loop: LoopState, checkpoints: CheckpointManager,
           logger: MetricLogger, watchdog: Watchdog) -> bool:
    """Steps from ``loop.step + 1`` to ``train.steps``; returns True when stopped early by :func:`request_stop`."""
    batches = task.batches()
    interval, eval_interval = cfg.checkpoint.interval, cfg.eval.interval
    flops = StepFlops(cfg, topo.world_size, topo.device)
    logger.log_once(loop.step, "flops_per_sample", flops.per_sample())
    while loop.step < cfg.train.steps:
        step_start = time.perf_counter()
        step = loop.step + 1
        with watchdog.phase("waiting for the data loader", step):
            batch = next(batches)
        step_flops = flops.count(batch)  # from host tensors, before the step moves them: no device sync
        with watchdog.phase("in the training step (forward, backward, gradient all-reduce, optimizer)", step):
            out = task.step(batch)
        names, metric_names = list(out.terms), list(out.metrics)
        # One collective per step: the local values and the stop flag (summed, so any rank's flag stops all), with
        # the task's metrics (already global, not summed) read in the same transfer.
        with watchdog.phase("in the loss all-reduce (a peer has not reached it)", step):
            stop_votes, *agreed = _agree(
                [float(_STOP.is_set()), out.loss, *out.terms.values(), *out.metrics.values()], topo.device,
                summed=len(names) + 2)
        values, metric_values = agreed[: len(names) + 1], agreed[len(names) + 1 :]
        loss, *terms = (value / topo.world_size for value in values)
        loop.step = step
        loop.samples_seen += cfg.train.global_batch
        if out.applied and not math.isfinite(loss):
            raise RuntimeError(f"step {loop.step}: the task applied an update with a non-finite loss ({loss})")
        if out.applied:
            loop.consecutive_skips = 0
            loop.first_loss = loss if loop.first_loss is None else loop.first_loss
            loop.last_loss = loss
        else:
            loop.skipped_steps += 1
            loop.consecutive_skips += 1
            log.warning("step %d: loss %s or a gradient is not finite; step skipped (%d in a row, %d in all)",
                        loop.step, loss, loop.consecutive_skips, loop.skipped_steps)
        seconds = time.perf_counter() - step_start
        logger.log_step(loop.step, {
            "loss": loss, **dict(zip(names, terms)), **dict(zip(metric_names, metric_values)),
            "samples_per_s": cfg.train.global_batch / seconds, **flops.rates(step_flops, seconds),
            "skipped_steps": loop.skipped_steps,
            # A collective of its own, so taken on the logger's log lines (and the last step) only, not every step.
            **({"skipped_samples": task.skipped_samples()}
               if step in (1, cfg.train.steps) or step % cfg.logging.interval == 0 else {}),
        })
        if loop.consecutive_skips >= cfg.train.max_consecutive_skipped_steps:
            checkpoints.wait()  # every rank stops here together, so a save in flight can still be committed
            raise FloatingPointError(
                f"{loop.consecutive_skips} consecutive steps up to step {loop.step} had a non-finite loss or "
                f"gradient (train.max_consecutive_skipped_steps={cfg.train.max_consecutive_skipped_steps}); "
                f"stopping. The last good checkpoint ({checkpoints.last_committed or 'none yet'}) is intact: "
                "lower optim.lr or check the data, then resume from it"
            )
        with watchdog.phase("committing a background checkpoint save", step):
            checkpoints.poll()
        last = loop.step == cfg.train.steps
        if eval_interval and loop.step % eval_interval == 0 and not last:
            with watchdog.phase("in evaluation", step):
                metrics = task.evaluate()
            if metrics is not None:
                logger.log_eval(loop.step, metrics)
        stop = stop_votes > 0
        if last or stop or (interval and loop.step % interval == 0):
            with watchdog.phase("saving a checkpoint", step):
                checkpoints.save(loop.step, task.state(), dataclasses.asdict(loop), task.data_key(),
                                 block=last or stop)
        if stop and not last:
            log.warning("stop requested: saved step %d and stopping", loop.step)
            return True
    return False


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
