"""Which collective backend a run gets — and never a silent CPU run on a GPU node.

``parallel.backend: auto`` picks NCCL when CUDA is usable and gloo otherwise. On a dev box that is what one wants;
on a GPU node whose driver cannot run the installed CUDA torch (or a CPU-only torch installed by mistake) it would
quietly train on the host at a thousandth of the speed. So ``auto`` refuses when the scheduler says GPUs were
assigned, and ``nccl`` refuses whenever CUDA is unusable; either error says why CUDA is unusable. A CPU run on a GPU
allocation is still possible, on purpose: ``parallel.backend: gloo``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch

# Set by Slurm for a step/job with GPUs (gres or --gpus*); CUDA_VISIBLE_DEVICES by Slurm or the user. All but
# SLURM_GPUS_ON_NODE (a count) list GPU ids, where "0" is GPU 0 — the one GPU of a single-GPU job.
GPU_ASSIGNMENT_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")
_NO_GPU_VALUES = {"", "-1", "(null)", "NoDevFiles"}
_COUNT_VARIABLES = {"SLURM_GPUS_ON_NODE"}


class BackendError(RuntimeError):
    """A GPU run was asked for (or GPUs were assigned) and CUDA cannot be used."""


def cuda_status() -> tuple[bool, str]:
    """(usable, why not). The reason quotes torch's own warning (e.g. a driver too old for this torch's CUDA)."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return True, ""
    said = "; ".join(str(w.message).strip() for w in caught)
    return False, said or f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def assigned_gpus(env: Mapping[str, str]) -> str | None:
    """The first variable that says GPUs were assigned to this task, as ``NAME=value``; None when none does."""
    for name in GPU_ASSIGNMENT_VARIABLES:
        value = env.get(name)
        if value is None or value.strip() in _NO_GPU_VALUES or (name in _COUNT_VARIABLES and value.strip() == "0"):
            continue
        return f"{name}={value}"
    return None


def resolve_backend(requested: str, env: Mapping[str, str] | None = None,
                    status: tuple[bool, str] | None = None) -> str:
    """``auto`` | ``nccl`` | ``gloo`` -> the backend to initialise, or :class:`BackendError`."""
    if requested == "gloo":
        return "gloo"
    usable, why = status if status is not None else cuda_status()
    if usable:
        return "nccl"
    if requested == "nccl":
        raise BackendError(f"parallel.backend: nccl, but CUDA is unusable on this node: {why}. Install a torch "
                           "built for this node's driver (nvidia-smi shows the CUDA version it supports), or set "
                           "parallel.backend: gloo to run on the CPU.")
    gpus = assigned_gpus(os.environ if env is None else env)
    if gpus is not None:
        raise BackendError(f"parallel.backend: auto, and this task was assigned GPUs ({gpus}), but CUDA is unusable: "
                           f"{why}. Refusing to train on the CPU instead. Fix the torch/driver pairing, or set "
                           "parallel.backend: gloo to run on the CPU on purpose.")
    return "gloo"


def collective_device() -> torch.device:
    """Where tensors handed to the default process group must live: NCCL reduces device tensors only."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
