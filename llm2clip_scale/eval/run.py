"""``llm2clip-scale eval``: build the stage-2 model a config describes, optionally load a checkpoint, run eval.tasks.

An entry point like the CLI: it composes the stage-2 task (train/stage2.py: the same towers, the same ``evaluate``)
with the checkpoint manager; nothing under train/ imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from llm2clip_scale.checkpoint.layout import CheckpointError, resolve_checkpoint
from llm2clip_scale.checkpoint.manager import CheckpointManager
from llm2clip_scale.config.load import validate
from llm2clip_scale.config.schema import Config
from llm2clip_scale.distributed.topology import build_topology, init_distributed
from llm2clip_scale.eval.task_config import write_eval_result


def build_stage2(cfg: Config, checkpoint: str | None = None):
    """The stage-2 task of ``cfg`` built on this rank's process groups, with the weights of ``checkpoint`` (a step
    directory, or a checkpoint root whose ``latest`` is taken) or as initialised; and ``{"checkpoint", "step"}``."""
    from llm2clip_scale.train.loop import seed_everything
    from llm2clip_scale.train.stage2 import Stage2Task

    if cfg.train.stage != "stage2":
        raise ValueError(f"llm2clip-scale eval: train.stage is {cfg.train.stage!r}; eval runs stage-2 models (for the "
                         "stage-1 LLM use `llm2clip-scale cra`)")
    validate(cfg)
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    topo = build_topology(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    seed_everything(cfg.train.seed)
    task = Stage2Task()
    task.build(cfg, topo)
    info: dict = {"checkpoint": None, "step": 0}
    if checkpoint is not None:
        # Rank 0 resolves (a root's `latest` may move while ranks look) and tells the others, a failure included:
        # every rank must raise, not wait in the broadcast for a rank that has left.
        choice: list = [None]
        if topo.is_main:
            try:
                resolved = resolve_checkpoint(checkpoint, cfg.checkpoint.dir)
                choice = [("ok", str(resolved)) if resolved is not None else
                          ("error", f"--checkpoint {checkpoint}: no checkpoint to load (under {cfg.checkpoint.dir})")]
            except CheckpointError as err:
                choice = [("error", str(err).replace("train.resume", "--checkpoint", 1))]
        dist.broadcast_object_list(choice, src=0)
        status, value = choice[0]
        if status == "error":
            raise CheckpointError(value)
        manager = CheckpointManager(cfg, topo, task.name)
        try:
            restored = manager.load(Path(value), task.state(), task.data_key())
            task.load_state(restored.shared, restored.task_rank)
        finally:
            manager.close()
        info = {"checkpoint": str(restored.path), "step": restored.step}
    return task, info


def evaluate_stage2(cfg: Config, checkpoint: str | None = None) -> dict:
    """Metrics of eval.tasks on the stage-2 model of ``cfg`` (see :func:`build_stage2`). Collective; every rank
    returns the same dict, and rank 0 writes it to ``<logging.dir>/eval.json``."""
    task, info = build_stage2(cfg, checkpoint)
    metrics = task.evaluate()
    if metrics is None:
        raise ValueError("eval.tasks: none of the tasks has data; set data.eval_shards or eval.<task>_data")
    result = {"stage": task.name, "tasks": list(cfg.eval.tasks), **info, **metrics}
    if task.topo.is_main:
        write_eval_result(cfg, result)
    return result
