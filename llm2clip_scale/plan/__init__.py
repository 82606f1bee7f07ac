"""Plan an allocation before spending it: per-GPU memory, FLOPs, communication and the MFU ceiling of a config on
a GPU layout (``llm2clip-scale plan``). Pure arithmetic over the typed config; no GPU, no process group."""

from llm2clip_scale.plan.estimate import Plan, check_layout, hints, plan
from llm2clip_scale.plan.hardware import GPUS, GPUKind, gpu_kind

__all__ = ["GPUS", "GPUKind", "Plan", "check_layout", "gpu_kind", "hints", "plan"]
