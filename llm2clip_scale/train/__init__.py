"""Training entry: ``run_training(cfg)`` dispatches on ``cfg.train.stage``.

Trainers are imported lazily so that a stage's heavy dependencies load only when that stage runs.
"""

from __future__ import annotations

from llm2clip_scale.config.schema import Config


def run_training(cfg: Config) -> dict:
    stage = cfg.train.stage
    if stage == "stage2":
        from llm2clip_scale.train.stage2 import train_stage2

        return train_stage2(cfg)
    if stage == "proclip_stage1":
        from llm2clip_scale.train.proclip_stage1 import train_proclip_stage1

        return train_proclip_stage1(cfg)
    if stage == "stage1_cc":
        from llm2clip_scale.train.stage1 import train_stage1

        return train_stage1(cfg)
    raise ValueError(f"train.stage: no trainer for {stage!r}")
