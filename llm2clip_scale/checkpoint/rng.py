"""Every random generator a rank draws from, captured and restored as one picklable dict.

Resume is bit-exact only if the resumed rank draws the same dropout masks, augmentations and LoRA dropout as the
uninterrupted one: Python's ``random``, NumPy, torch's CPU generator, every CUDA device's, and megatron's
model-parallel RNG tracker (whose named states drive TP-region dropout).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "megatron_tracker": {name: state.clone() for name, state in tracker.get_states().items()},
    }


def restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["megatron_tracker"]:
        get_cuda_rng_tracker().set_states({name: s.clone() for name, s in state["megatron_tracker"].items()})
