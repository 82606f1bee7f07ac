"""The DeepSpeed engine keeps CLIP's temperature capped: after each optimizer step the stored logit scale (the fp32
master under ZeRO 1/2 and bf16) is clamped, so the forward clamp never pins it above the cap. ZeRO-3 clamps only the
module's copy (a DeepSpeed limitation, see clamp_logit_scale)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.multiprocess import run_on_ranks

CAP = math.log(100.0)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.logit_scale = nn.Parameter(torch.full([1], 4.5))
        self.logit_scale_max = CAP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rewards a larger scale without bound, as an easy contrastive task does.
        return self.proj(x).pow(2).mean() - 10.0 * self.logit_scale.sum()


def _clamped_values(variants: list[tuple[int, str]]) -> list[tuple[float, float]]:
    from deepspeed.utils import safe_get_full_fp32_param

    from llm2clip_scale.config.schema import Config
    from llm2clip_scale.distributed.topology import init_distributed
    from llm2clip_scale.train.engine import build_engine, clamp_logit_scale

    init_distributed("gloo")
    values = []
    for stage, precision in variants:
        cfg = Config()
        cfg.parallel.zero_stage = stage
        cfg.train.precision, cfg.train.global_batch, cfg.train.micro_batch = precision, 2, 1
        cfg.train.steps, cfg.train.warmup_steps = 10, 0
        cfg.optim.lr, cfg.optim.grad_clip = 1.0, 0.0
        torch.manual_seed(0)
        engine = build_engine(_Scaled(), cfg, world_size=2, device=torch.device("cpu"))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for _ in range(2):
            loss = engine(torch.randn(2, 4, dtype=dtype))
            engine.backward(loss.float())
            engine.step()
            clamp_logit_scale(engine.module)
        param = engine.module.logit_scale
        master = None if hasattr(param, "ds_id") else safe_get_full_fp32_param(param)
        stored = param if master is None else master
        values.append((float(stored.max()), float(engine.module.logit_scale.float().max())))
    return values


def test_logit_scale_is_clamped_in_every_zero_stage() -> None:
    # (2, "bf16") is the ViT-E configuration: the module holds a bf16 copy and the fp32 master lives in ZeRO-2's
    # partitions; clamping only the module copy leaves that master at ~6.48 (measured), far above the cap.
    variants = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32")]
    results = run_on_ranks(_clamped_values, 2, variants)
    for (stage, precision), (master, module) in zip(variants, results[0]):
        # AdamW at lr 1 moves the parameter ~1 per step from 4.5: without the clamp it would sit near 6.5.
        assert module <= CAP + 0.02, (stage, precision)  # the bf16 copy rounds the cap (8 mantissa bits)
        if stage < 3:
            assert master == pytest.approx(CAP, abs=1e-6), (stage, precision)
    assert results[0] == results[1]
