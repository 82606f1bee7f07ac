"""Training entry: ``run_training(cfg)`` builds the task named by ``cfg.train.stage`` and runs the one loop.

Tasks are imported lazily so that a stage's heavy dependencies load only when that stage runs.
"""

from __future__ import annotations

from llm2clip_scale.config.schema import Config


def build_task(stage: str):
    """The task object of ``train.stage`` (train/task.py describes what a task provides)."""
    if stage == "stage2":
        from llm2clip_scale.train.stage2 import Stage2Task

        return Stage2Task()
    if stage == "proclip_inherit":
        from llm2clip_scale.train.proclip_inherit import ProCLIPInheritTask

        return ProCLIPInheritTask()
    if stage == "llm2clip_cc":
        from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask

        return LLM2CLIPCaptionContrastiveTask()
    raise ValueError(f"train.stage: no task for {stage!r}")


def run_training(cfg: Config) -> dict:
    from llm2clip_scale.train.loop import run

    return run(cfg, build_task(cfg.train.stage))
