"""The trained LLM side of a checkpoint: LoRA matrices and their AdamW moments through megatron-core
``dist_checkpointing``, which stores each tensor once, globally indexed, so a checkpoint written at one TP x PP
layout loads at any other.

Every LoRA matrix is a :class:`ShardedTensor` under a global key (global layer index, so PP stages do not collide):
TP-split matrices (row-parallel A, column-parallel B) declare their axis and this rank's slice, replicated ones are
whole on every TP rank. Copies held by other replicas (TP ranks of a replicated matrix, LLM data-parallel ranks)
carry a non-zero ``replica_id``, so exactly one rank writes each tensor. The optimizer's step count and the lr
schedule are identical everywhere and travel in the common (rank-0) state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from llm2clip_scale.checkpoint.layout import CheckpointError
from llm2clip_scale.checkpoint.lora import global_lora_key
from llm2clip_scale.models.llm.lora import lora_adapters, lora_split_dim

_MOMENTS = ("exp_avg", "exp_avg_sq")


class LoRATrainingState:
    """Save/load of one rank's LoRA parameters, their AdamW state and the lr schedule (collective calls)."""

    def __init__(self, tower: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.tower, self.params, self.optimizer, self.scheduler = tower, params, optimizer, scheduler

    def _entries(self) -> list[tuple[str, nn.Parameter, int | None]]:
        """(global key, parameter, TP-split axis or None) of every LoRA matrix on this rank."""
        entries = []
        for name, adapter in lora_adapters(self.tower).items():
            for which, table in (("A", adapter.A), ("B", adapter.B)):
                for target, param in table.items():
                    entries.append((global_lora_key(self.tower, f"{name}.{which}.{target}"), param,
                                    lora_split_dim(adapter, which)))
        return entries

    def _adam_state(self, param: nn.Parameter) -> dict:
        state = self.optimizer.state[param]
        if not state:  # no step taken yet: the state AdamW would create lazily
            state["step"] = torch.tensor(0.0)
            for moment in _MOMENTS:
                state[moment] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def sharded_state_dict(self) -> dict:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        sharded: dict = {}
        steps = set()
        for key, param, axis in self._entries():
            state = self._adam_state(param)
            steps.add(float(state["step"]))
            for slot, tensor in (("weight", param.data), *((m, state[m]) for m in _MOMENTS)):
                name = f"lora.{key}.{slot}"
                if axis is None:
                    # Replicated over TP: TP rank 0 of DP rank 0 writes it.
                    sharded[name] = ShardedTensor.from_rank_offsets(name, tensor, replica_id=(0, tp_rank, dp_rank))
                else:
                    sharded[name] = ShardedTensor.from_rank_offsets(name, tensor, (axis, tp_rank, tp_size),
                                                                    replica_id=(0, 0, dp_rank))
        if len(steps) > 1:
            raise RuntimeError(f"LoRA parameters disagree on their AdamW step count: {sorted(steps)}")
        sharded["common"] = {"adam_step": steps.pop() if steps else 0.0, "scheduler": self.scheduler.state_dict(),
                             "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                              for g in self.optimizer.param_groups]}
        return sharded

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)  # dist_checkpointing expects it to exist
        dist.barrier()
        dist_checkpointing.save(self.sharded_state_dict(), str(directory))

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: missing; this checkpoint holds no trained LLM state")
        template = self.sharded_state_dict()
        try:
            # raise_all: keys missing on either side fail on every rank before anything is read (no hang).
            loaded = dist_checkpointing.load(template, str(directory), strict="raise_all")
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - the latter derives from BaseException
            raise CheckpointError(f"{directory}: cannot load the LoRA training state ({type(err).__name__}: {err}); "
                                  "was it written with the same model.llm.lora_* settings?") from err
        for key, param, _ in self._entries():
            param.copy_(loaded[f"lora.{key}.weight"])
            state = self.optimizer.state[param]
            state["step"] = torch.tensor(float(loaded["common"]["adam_step"]))
            for moment in _MOMENTS:
                state[moment].copy_(loaded[f"lora.{key}.{moment}"])
        for group, saved in zip(self.optimizer.param_groups, loaded["common"]["param_groups"], strict=True):
            group.update(saved)
        self.scheduler.load_state_dict(loaded["common"]["scheduler"])
