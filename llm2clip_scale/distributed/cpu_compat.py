"""The one place that lets megatron-core 0.16.1 run on the CPU (dev boxes, CI); inert in a run on GPUs.

megatron-core's models assume CUDA in a few spots (measured in notes/CPU_STACK.md §2): its RNG tracker reads
``torch.cuda`` generator states, about 175 call sites ask ``torch.cuda.current_device()`` where to allocate, and
checkpointing/schedules call ``torch.cuda.synchronize``. We monkeypatch those few entry points instead of editing
megatron's source. The hard-coded ``device="cuda"`` default causal mask is avoided rather than patched: the LLM
tower always passes an explicit boolean mask. The pipeline schedules allocate their token counter with a
hard-coded ``device="cuda"`` (schedules.py ~596/983/2138); only while a schedule runs, a TorchFunctionMode maps
that device to the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def is_enabled() -> bool:
    """Whether the CPU patches are active in this process."""
    return _ENABLED


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _noop(*_args: object, **_kwargs: object) -> None:
    return None


def _make_cpu_tracker_class(base: type, default_name: str) -> type:
    """Megatron's CudaRNGStatesTracker, keeping named CPU generator states instead of CUDA ones.

    ``model_parallel_cuda_manual_seed`` registers per-TP-rank states and every attention-dropout call enters
    ``tracker.fork()``, even at p=0, so the tracker must work for any forward pass, not only for dropout.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name: str, seed: int) -> None:
            # The base class calls torch.cuda.get_rng_state(), which asserts on a CPU-only machine.
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = default_name) -> Iterator[None]:
            # The base fork warns whenever the CPU state moves inside it, which is exactly what a CPU tracker does.
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites an explicit ``device="cuda"`` (or cuda:N) argument of any torch call to the CPU."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": torch.device("cpu")}
        return func(*args, **kwargs)


def _on_cpu_devices(schedule: Callable) -> Callable:
    @functools.wraps(schedule)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _CudaDeviceToCpu():
            return schedule(*args, **kwargs)

    return run


# The schedule functions get_forward_backward_func() hands out (it reads these module globals at call time).
PIPELINE_SCHEDULES = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
)


def enable_cpu_compat(on_cpu: bool | None = None) -> None:
    """Patch torch.cuda / megatron entry points so megatron-core models run on CPU. Idempotent.

    ``on_cpu``: whether this process computes on the CPU (build_topology: its process group is not NCCL); by
    default, whether CUDA is absent. A no-op otherwise.
    """
    global _ENABLED
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if _ENABLED or not on_cpu:
        return
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    # Allocation sites (RoPE inv_freq, GlobalMemoryBuffer, dist_checkpointing) ask current_device() where to go.
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]
    # Checkpoint saving and pipeline schedules synchronise the (absent) stream; nothing to wait for on CPU.
    torch.cuda.synchronize = _noop  # type: ignore[assignment]
    torch.cuda.empty_cache = _noop  # type: ignore[assignment]
    # initialize_rng_tracker() instantiates the class through this module global, so swapping the name is enough.
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker_class(
        mrandom.CudaRNGStatesTracker, mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    )
    # Activation recompute (CheckpointFunction) saves/restores "CUDA" RNG state through these helpers.
    mrandom._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    # A tracker created before the swap would still be the CUDA one.
    mrandom.initialize_rng_tracker(force_reset=True)
    # Scoped to the schedule call, so model code outside a schedule keeps plain torch semantics.
    for name in PIPELINE_SCHEDULES:
        setattr(schedules, name, _on_cpu_devices(getattr(schedules, name)))
    _ENABLED = True
