"""Process-group set-up and the colocated layout of DESIGN.md.

Every rank holds a vision-tower replica (data-parallel over the whole world, under DeepSpeed) and one shard of the
LLM: megatron-core parallel_state splits the world into TP x PP model-parallel groups; LLM data parallel is
world / (TP * PP).
"""

from __future__ import annotations

import faulthandler
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llm2clip_scale.distributed.backend import collective_device, resolve_backend


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    tp_rank: int
    pp_rank: int
    llm_dp_rank: int
    llm_dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def _deepspeed_on_cpu() -> None:
    """A gloo run on a machine with CUDA: DeepSpeed would detect CUDA and place the engine there."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # read at DeepSpeed's first get_accelerator() ...
    from deepspeed.accelerator import real_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    real_accelerator.set_accelerator(CPU_Accelerator())  # ... which importing deepspeed may already have made


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0) -> None:
    """Initialise torch.distributed from torchrun (RANK/WORLD_SIZE) or Slurm (SLURM_PROCID/SLURM_NTASKS) variables.

    A single process with neither set becomes a world of one, so the same entry point serves debugging.
    """
    if dist.is_initialized():
        return
    # A native crash (SIGSEGV, SIGABRT) in a rank then prints every thread's Python stack into the job's log.
    faulthandler.enable(all_threads=True)
    backend = resolve_backend(backend)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    elif torch.cuda.is_available():
        _deepspeed_on_cpu()
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))


def build_topology(tp_size: int = 1, pp_size: int = 1) -> Topology:
    """Create megatron-core's TP/PP/DP groups over the initialised world and describe this rank's place in them."""
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.cpu_compat import enable_cpu_compat

    # The device follows the process group, not the machine: a gloo run on a GPU node (on purpose, see
    # distributed/backend.py) is a CPU run throughout.
    device = collective_device()
    enable_cpu_compat(on_cpu=device.type == "cpu")
    world = dist.get_world_size()
    if world % (tp_size * pp_size):
        raise ValueError(f"TP ({tp_size}) x PP ({pp_size}) does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() != tp_size
        or parallel_state.get_pipeline_model_parallel_world_size() != pp_size
    ):
        # Groups of another layout (a previous run in this process): reusing them would embed with TP/PP sizes the
        # returned Topology does not describe.
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        # No gloo twins of the DP groups: only megatron's distributed optimizer uses them (we do not), and at scale
        # they are thousands of cross-node TCP connections made at start-up.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
            create_gloo_process_groups=False,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return Topology(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        tp_size=tp_size,
        pp_size=pp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        llm_dp_rank=parallel_state.get_data_parallel_rank(),
        llm_dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
