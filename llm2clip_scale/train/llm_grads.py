"""Gradients of the sharded LLM's trainable (LoRA) parameters outside DeepSpeed: the LLM-DP average and the global
norm clip that stage 1 and its MNTP pre-step apply once per step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import nn


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to the global norm over the whole model (TP shards and PP stages); return the norm before clipping.

    A replicated LoRA matrix counts once (on TP rank 0), a TP-sharded one on every rank, and the squares are summed
    over the model-parallel group: the norm a TP=1 x PP=1 run would compute.
    """
    device = params[0].device
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.double().pow(2).sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def average_over_data_parallel(params: list[nn.Parameter]) -> None:
    """Average LoRA gradients over the LLM-DP group with one flat all-reduce.

    Not megatron's DistributedDataParallel: its grad buffers and its grad-clipping/optimizer companions check for
    ``torch.cuda`` tensor types (notes/CPU_STACK.md, extras), which would need a fake-CUDA mode on CPU; the
    trainable set is only the LoRA matrices (~0.5% of Llama-3-8B), so one bucket per step costs nothing worth
    overlapping with backward.
    """
    group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
