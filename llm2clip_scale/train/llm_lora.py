"""The LLM's LoRA adapters as trained outside DeepSpeed, by LLM2CLIP stage 1 and by stage 2 with a trainable LoRA:
attach them, AdamW with the warmup-cosine schedule, the LLM-DP gradient average and global-norm clip once per step,
and the checkpoint parts (dist_checkpointing training state + the TP/PP-independent ``lora.safetensors``).

Not megatron's DistributedDataParallel/optimizer: the trainable set is only the LoRA matrices (~0.5% of Llama-3-8B),
and megatron's grad buffers check for ``torch.cuda`` tensor types (notes/CPU_STACK.md), which would need a fake-CUDA
mode on CPU.
"""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from torch import nn

from llm2clip_scale.checkpoint.layout import ADAPTER_CONFIG_FILE, LORA_FILE
from llm2clip_scale.checkpoint.llm_state import LoRATrainingState
from llm2clip_scale.checkpoint.lora import global_lora_state
from llm2clip_scale.config.schema import Config
from llm2clip_scale.kernels import build_optimizer
from llm2clip_scale.models.llm.lora import apply_lora
from llm2clip_scale.models.llm.tower import LLMTextEncoder
from llm2clip_scale.train.schedule import warmup_cosine


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
    """Average LoRA gradients over the LLM-DP group with one flat all-reduce (one bucket per step: too small to be
    worth overlapping with backward)."""
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


class LoRATrainer:
    """Attach LoRA (``model.llm.lora_*``) to ``tower`` and own its optimizer, schedule and checkpoint parts."""

    def __init__(self, tower: LLMTextEncoder, cfg: Config, lr: float | None = None) -> None:
        llm, optim = cfg.model.llm, cfg.optim
        self.cfg, self.tower = cfg, tower
        self.params = apply_lora(tower, llm.lora_rank, llm.lora_alpha, llm.lora_dropout, llm.lora_targets)
        self.optimizer = build_optimizer(self.params, lr=optim.lr if lr is None else lr, betas=tuple(optim.betas),
                                         eps=optim.eps, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio),
        )

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, also_skip: bool = False) -> tuple[float, bool]:
        """Average the accumulated gradients over LLM-DP, clip to ``optim.grad_clip`` and take the AdamW step unless
        the norm is not finite (or ``also_skip``); clear the gradients. Returns (norm before clipping, applied). The
        norm is global, so every rank decides alike."""
        average_over_data_parallel(self.params)
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        applied = math.isfinite(grad_norm) and not also_skip
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.zero_grad()
        return grad_norm, applied

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def checkpoint_parts(self) -> tuple[LoRATrainingState, dict[str, dict | str]]:
        """(training state for ``TaskState.llm``, shared files: ``lora.safetensors`` + ``adapter_config.json``).
        Collective: the LoRA file is gathered over TP and PP."""
        llm = self.cfg.model.llm
        meta = {"lora_rank": llm.lora_rank, "lora_alpha": llm.lora_alpha, "lora_dropout": llm.lora_dropout,
                "lora_targets": list(llm.lora_targets), "base_checkpoint": llm.hf_checkpoint, "base_seed": llm.seed,
                # A stage-2 LoRA trains on top of a merged stage-1 one: its base is that merged tower.
                "base_lora_init": llm.lora_init, "caption_format": llm.caption_format,
                "bidirectional": llm.bidirectional, "instruction": llm.instruction, "stage": self.cfg.train.stage}
        state = LoRATrainingState(self.tower, self.params, self.optimizer, self.scheduler)
        return state, {LORA_FILE: global_lora_state(self.tower), ADAPTER_CONFIG_FILE: json.dumps(meta, indent=2)}
