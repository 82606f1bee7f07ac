"""Loading the DeepSpeed (vision) side of a checkpoint, at the data-parallel size it was saved with or another.

Same world size and ZeRO stage: DeepSpeed's own ``load_checkpoint`` (ZeRO partitions, optimizer, lr schedule),
bit-exact. Another world size (any stage), or ZeRO-1 <-> ZeRO-2: ZeRO partitions belong to the old ranks and stage,
so the checkpoint is first converted to DeepSpeed's
universal checkpoint format (``deepspeed.checkpoint.ds_to_universal``: one fp32 file per parameter for the weights
and each optimizer moment), once, by rank 0, next to the original; every rank then loads it with
``checkpoint.load_universal``, which re-partitions for the new world.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from llm2clip_scale.checkpoint.layout import CheckpointError

log = logging.getLogger("llm2clip_scale.checkpoint")


def load_engine(engine: object, path: Path, tag: str, saved_world: int, world: int,
                saved_stage: int | None = None) -> None:
    """Restore ``engine`` (a DeepSpeedEngine) from ``path/tag``, saved by ``saved_world`` ranks under ZeRO stage
    ``saved_stage`` (None: this engine's); collective."""
    if not (path / tag).is_dir():
        raise CheckpointError(f"{path / tag}: missing; this checkpoint has no DeepSpeed part for the vision side")
    stage = engine.zero_optimization_stage()
    saved_stage = stage if saved_stage is None else saved_stage
    if saved_world == world and saved_stage == stage:
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path / tag}: DeepSpeed found no checkpoint to load")
        return
    if saved_stage != stage and {saved_stage, stage} != {1, 2}:
        # ZeRO-0 keeps the optimizer in the model file and ZeRO-3 names its model files per rank; DeepSpeed's
        # universal loader (the conversion below) looks for the target stage's files, so it crosses neither boundary.
        raise CheckpointError(
            f"{path}: saved under parallel.zero_stage={saved_stage} (by {saved_world} rank(s)); this run has "
            f"zero_stage={stage} ({world} rank(s)). A checkpoint reloads at another world size under its own stage, "
            "and between ZeRO stages 1 and 2; not into or out of ZeRO-0 or ZeRO-3: set parallel.zero_stage="
            f"{saved_stage} (tools/convert_to_hf.py exports a checkpoint of any layout)")
    _load_resharded(engine, path, tag, saved_world, world)


def _load_resharded(engine: object, path: Path, tag: str, saved_world: int, world: int) -> None:
    stage = engine.zero_optimization_stage()
    if stage == 0:  # and so was the saved one (load_engine)
        # ZeRO-0 keeps whole optimizer states in the rank-0 model file: nothing is partitioned by rank.
        log.info("%s: loading a ZeRO-0 checkpoint saved at world %d into world %d", path, saved_world, world)
        engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        return
    universal = f"{tag}_universal"
    if dist.get_rank() == 0 and not (path / universal).is_dir():
        log.info("%s: ZeRO-%d partitions of %d ranks -> universal checkpoint for %d ranks", path, stage, saved_world,
                 world)
        _convert_to_universal(path / tag, path / universal)
    dist.barrier()
    if not (path / universal).is_dir():
        raise CheckpointError(f"{path / universal}: the universal conversion did not produce it (see rank 0's log)")
    engine._config.load_universal_checkpoint = True  # read by load_checkpoint only; the engine is built already
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag=universal, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise CheckpointError(f"{path / universal}: DeepSpeed found no checkpoint to load")


def _convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's own converter (one fp32 file per parameter and optimizer moment), into a temporary name first."""
    import argparse
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    ds_to_universal(argparse.Namespace(
        input_folder=str(source), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))
    partial.rename(target)
