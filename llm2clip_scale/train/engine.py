"""DeepSpeed engine for the trainable side of stage 2 (vision tower + adapter + logit scale).

The vision side is data-parallel over the whole world: no mpu is passed, so DeepSpeed's DP group is the world
and ZeRO shards over every rank, independently of the LLM's TP x PP groups.
"""

from __future__ import annotations

import functools

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch import nn

from llm2clip_scale.config.schema import Config
from llm2clip_scale.kernels import build_optimizer
from llm2clip_scale.models.vision.param_groups import build_param_groups
from llm2clip_scale.train.schedule import warmup_cosine


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    train = cfg.train
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // (train.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,  # our MetricLogger reports; silence DeepSpeed's own step prints
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module, cfg: Config, world_size: int, device: torch.device
) -> deepspeed.DeepSpeedEngine:
    # On the device first: the kernel registry hands out a fused AdamW only for parameters already on CUDA.
    model.to(device)
    optimizer = build_optimizer(
        build_param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.model.vision.layer_decay),
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
    )
    schedule = functools.partial(
        warmup_cosine, total_steps=cfg.train.steps, warmup_steps=cfg.train.warmup_steps,
        min_ratio=cfg.train.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    if isinstance(engine.optimizer, torch.optim.Optimizer) and not hasattr(engine.optimizer, "overflow"):
        _skip_non_finite_steps(engine.optimizer)
    return engine


def _skip_non_finite_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give DeepSpeed's plain-optimizer path (ZeRO-0 in fp32) the overflow check its other optimizers have.

    ZeRO 1-3 and the bf16 optimizer find non-finite gradients themselves, skip the update and report ``overflow``,
    and the engine then leaves the lr schedule alone and ``was_step_applied()`` is False. A bare torch optimizer gets
    no such check, so this wrapper sets ``overflow`` the same way (gradients are already averaged over ranks when
    the engine steps, so every rank decides alike) and steps only when all gradients are finite.
    """
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        if not optimizer.overflow:
            return step(*args, **kwargs)
        return None

    optimizer.overflow = False
    optimizer.step = guarded_step


@torch.no_grad()
def clamp_logit_scale(module: nn.Module) -> None:
    """Cap the learnable temperature at ``module.logit_scale_max`` after an optimizer step, as CLIP does.

    The forward clamp alone would zero the gradient once the parameter overshoots, pinning it above the cap for good;
    clamping the stored value keeps it where gradients reach it. Under ZeRO 1/2 (and DeepSpeed's bf16 optimizer) the
    value that persists is the fp32 master copy, so that is clamped too. ZeRO-3 is the exception: DeepSpeed 0.19's
    ``set_full_hp_param`` cannot write a parameter with fewer elements than ranks, so there the cap holds through the
    forward clamp only (tests/test_engine.py pins this behaviour).
    """
    param = module.logit_scale
    cap = module.logit_scale_max
    param.data.clamp_(max=cap)  # the copy the next forward reads (the master itself in plain fp32 training)
    if hasattr(param, "ds_id"):  # ZeRO-3, see above
        return
    master = safe_get_full_fp32_param(param)
    if master is not None and master.max().item() > cap:
        safe_set_full_fp32_param(param, master.clamp(max=cap))
