"""DeepSpeed engine for the trainable side of stage 2 (vision tower + adapter + logit scale).

The vision side is data-parallel over the whole world: no mpu is passed, so DeepSpeed's DP group is the world
and ZeRO shards over every rank, independently of the LLM's TP x PP groups.
"""

from __future__ import annotations

import functools

import deepspeed
import torch
from torch import nn

from llm2clip_scale.config.schema import Config
from llm2clip_scale.kernels import build_optimizer
from llm2clip_scale.models.vision.param_groups import build_param_groups
from llm2clip_scale.train.schedule import warmup_cosine

OVERLAP_BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    train = cfg.train
    stage = cfg.parallel.zero_stage
    zero: dict = {"stage": stage}
    if stage >= 2:
        # Reduce gradient buckets while backward still runs (a side stream on GPU; on CPU ranks DeepSpeed's
        # accelerator runs it in order, same result). Buckets of 5e7 elements, not DeepSpeed's 5e8: overlap keeps two
        # staging buckets in the gradients' dtype (2 x 100 MB in bf16 instead of 2 x 1 GB), still far above the size
        # where a collective reaches bus bandwidth.
        zero.update(overlap_comm=True, reduce_bucket_size=OVERLAP_BUCKET_ELEMENTS)
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // (train.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        # Gradients are summed over the whole world (every rank is a vision replica). In bf16, DeepSpeed's default
        # for bf16 training, every partial sum of the reduction (one per rank on a ring) is rounded to 8 significant
        # bits, so at 128 ranks the small gradients of a large batch round away; they travel in fp32 instead
        # (twice bf16's bytes; what fp32 training sends anyway).
        "communication_data_type": "fp32",
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
        # One host read for all gradients, not one per tensor (each read waits for the device).
        optimizer.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
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
    value that persists is the fp32 master copy, so that is clamped too: in place, on the fragment of it this rank
    holds (DeepSpeed's ``_hp_mapping``), which needs no collective and no host read — clamping is elementwise, so
    every rank clamping its fragment clamps the whole master. ZeRO-3 is the exception: DeepSpeed 0.19's
    ``set_full_hp_param`` cannot write a parameter with fewer elements than ranks, so there the cap holds through the
    forward clamp only (tests/test_engine.py pins this behaviour).
    """
    param = module.logit_scale
    cap = module.logit_scale_max
    param.data.clamp_(max=cap)  # the copy the next forward reads (the master itself in plain fp32 training)
    if hasattr(param, "ds_id"):  # ZeRO-3, see above
        return
    mapping = getattr(param, "_hp_mapping", None)  # None: plain training, or no fragment on this rank
    if mapping is not None:
        mapping.get_hp_fragment().clamp_(max=cap)
