"""One registry deciding, per kernel slot, whether a fused implementation or the torch reference runs.

Every slot is applied by the training path named in ``WHERE`` (and nowhere else): ``layernorm`` by the adapter
(``build_layernorm``), ``rmsnorm`` by the LLM tower's local layer spec (``build_rmsnorm`` through
``models/llm/tower.py``), ``adamw`` by every optimizer (``build_optimizer``), ``attention`` by the vision tower (timm's
fused-attention flag, set per build in ``models/vision/timm_tower.py``), ``megatron_layer_spec`` by the LLM tower
(``layer_spec_name``). ``tests/test_kernels.py`` checks that each builds what its report says.

Detection only asks ``importlib.util.find_spec``, ``torch.cuda`` and ``torch.backends`` (never imports apex /
Transformer Engine / timm), and never raises: a broken probe means "reference". ``LLM2CLIP_DISABLE_FUSED`` (``1``/
``all``, or a comma list of slots) or ``force_reference=True`` pins the reference, which is how numerics are compared.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DISABLE_ENV = "LLM2CLIP_DISABLE_FUSED"
SLOTS = ("layernorm", "rmsnorm", "adamw", "attention", "megatron_layer_spec")
FLASH_MIN_CAPABILITY = (8, 0)  # torch SDPA's flash backend (FlashAttention-2) needs Ampere or newer
TIMM_FUSED_ATTN_ENV = "TIMM_FUSED_ATTN"  # timm's own switch (timm/layers/config.py): "0" turns its SDPA path off


@dataclass(frozen=True)
class KernelChoice:
    slot: str
    name: str
    fused: bool
    reason: str  # why this implementation: what is installed, the device, an override
    runs: str = ""  # where training applies it and what that executes (WHERE, WHAT)


def _present(module: str) -> bool:
    try:  # top-level names only: find_spec("a.b") would import "a"
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> tuple[bool, str]:
    try:
        if torch.cuda.is_available():
            return True, f"CUDA device {torch.cuda.get_device_name(0)}"
    except Exception as err:  # a broken driver must not take the run down; it just means no fused kernels
        return False, f"CUDA probe failed ({err})"
    return False, "no CUDA device"


def _disabled(slot: str, force_reference: bool | None) -> str | None:
    if force_reference:
        return "reference forced by caller"
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "all") or slot in {v.strip() for v in value.split(",")}:
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} set"
    return None


# Fused candidates per slot, best first: (name, package that provides it; "torch" is always there). All but attention
# are CUDA kernels. Attention (torch SDPA under timm, on any device) has its own rules in _resolve_attention.
CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "layernorm": (("apex.FusedLayerNorm", "apex"), ("te.LayerNorm", "transformer_engine")),
    "rmsnorm": (("apex.FusedRMSNorm", "apex"), ("te.RMSNorm", "transformer_engine")),
    # torch's own fused AdamW only: it ships compiled with torch, where DeepSpeed's FusedAdam is JIT-built by every
    # rank at start-up (minutes, a compiler on every node) and apex's needs a matching build; all three run the same
    # multi-tensor update.
    "adamw": (("torch.AdamW(fused)", "torch"),),
    "attention": (("sdpa", "torch"),),
    "megatron_layer_spec": (("transformer_engine", "transformer_engine"),),
}
REFERENCE = {"layernorm": "torch.nn.LayerNorm", "rmsnorm": "torch.nn.RMSNorm", "adamw": "torch.optim.AdamW",
             "attention": "timm.explicit", "megatron_layer_spec": "local"}
# The training code each slot drives. Nothing else consults the registry: timm's own norms in the vision tower, and
# the LLM's attention under the local spec, are not switchable kernels here and are not reported as if they were.
WHERE = {
    "layernorm": "adapter LayerNorms (models/adapter.py)",
    "rmsnorm": "LLM tower RMSNorms (input, pre-MLP, final) under megatron's local spec",
    "adamw": "every optimizer (DeepSpeed's client optimizer, stage-1 LoRA, MNTP)",
    "attention": "vision tower attention (timm blocks, attention pool)",
    "megatron_layer_spec": "LLM tower layers (layer_spec auto; a tower with LoRA takes local)",
}
WHAT = {
    "sdpa": "timm calls F.scaled_dot_product_attention",
    "timm.explicit": "timm's unfused softmax(q k^T) v",
    "local": "megatron DotProductAttention (unfused softmax in torch ops), norms of the rmsnorm slot",
    "transformer_engine": "TE DotProductAttention (flash / cuDNN fused, TE's pick), TE RMSNorm fused into the linears",
}


def resolve(slot: str, force_reference: bool | None = None) -> KernelChoice:
    """The implementation ``slot`` uses here, with the reason and what training runs with it."""
    if slot not in SLOTS:
        raise KeyError(f"unknown kernel slot {slot!r}; known: {', '.join(SLOTS)}")
    choice = _choose(slot, force_reference)
    what = WHAT.get(choice.name)
    return dataclasses.replace(choice, runs=f"{WHERE[slot]}: {what}" if what else WHERE[slot])


def _choose(slot: str, force_reference: bool | None) -> KernelChoice:
    """Candidates best first; the first one installed wins on a CUDA device."""
    disabled = _disabled(slot, force_reference)
    if disabled:
        return KernelChoice(slot, REFERENCE[slot], False, disabled)
    cuda, cuda_why = _cuda()
    if slot == "attention":
        return _resolve_attention(cuda, cuda_why)
    present = [(name, pkg) for name, pkg in CANDIDATES[slot] if pkg == "torch" or _present(pkg)]
    if present and cuda:
        name, pkg = present[0]
        return KernelChoice(slot, name, True, f"{pkg} installed, {cuda_why}")
    # Say everything that is missing, so `env` tells what to install as well as that a GPU is needed.
    missing = [pkg for _, pkg in CANDIDATES[slot] if pkg != "torch" and not _present(pkg)]
    reasons = ([f"{', '.join(missing)} not installed"] if missing else []) + ([] if cuda else [cuda_why])
    return KernelChoice(slot, REFERENCE[slot], False, "; ".join(reasons))


def _resolve_attention(cuda: bool, cuda_why: str) -> KernelChoice:
    """timm's attention modules call F.scaled_dot_product_attention when timm's fused-attention flag is on (the
    vision tower sets it from this choice); torch then picks the kernel per call, which the reason predicts."""
    timm_flag = os.environ.get(TIMM_FUSED_ATTN_ENV, "").strip()
    if timm_flag and timm_flag.lstrip("-").isdigit() and int(timm_flag) <= 0:  # timm's own parse: int(), 0 = off
        return KernelChoice("attention", "timm.explicit", False, f"{TIMM_FUSED_ATTN_ENV}={timm_flag} set")
    if not cuda:
        return KernelChoice("attention", "sdpa", True, f"{cuda_why}: torch's flash-attention CPU kernel")
    try:
        capability = torch.cuda.get_device_capability(0)
        flash_on = torch.backends.cuda.flash_sdp_enabled()
        efficient_on = torch.backends.cuda.mem_efficient_sdp_enabled()
    except Exception as err:  # only a broken driver gets here; it must not stop the run
        return KernelChoice("attention", "sdpa", False, f"CUDA probe failed ({err}): torch's math kernel")
    cap = f"{capability[0]}.{capability[1]}"
    kernels = []  # torch's default priority: flash, mem-efficient, math (cuDNN only after math)
    if flash_on and capability >= FLASH_MIN_CAPABILITY:
        kernels.append("flash (fp16/bf16)")
    if efficient_on:
        kernels.append("mem-efficient")
    notes = []
    if capability < FLASH_MIN_CAPABILITY:
        notes.append(f"CUDA capability {cap} < 8.0 required by flash attention")
    elif not flash_on:
        notes.append("SDPA flash backend disabled in torch")
    if not efficient_on:
        notes.append("SDPA mem-efficient backend disabled in torch")
    if not kernels:
        return KernelChoice("attention", "sdpa", False, "; ".join(notes) + ": torch's math kernel")
    dispatch = f"torch dispatches per call to {', else '.join(kernels)}, else math"
    return KernelChoice("attention", "sdpa", True, "; ".join([f"CUDA capability {cap}", *notes, dispatch]))


def resolve_all(force_reference: bool | None = None) -> dict[str, KernelChoice]:
    return {slot: resolve(slot, force_reference) for slot in SLOTS}


def _norm(slot: str, dim: int, eps: float, force_reference: bool | None) -> nn.Module:
    choice = resolve(slot, force_reference)
    try:  # the imports live here so only a chosen fused package is ever loaded
        if choice.name == "apex.FusedLayerNorm":
            from apex.normalization import FusedLayerNorm

            return FusedLayerNorm(dim, eps=eps)
        if choice.name == "apex.FusedRMSNorm":
            from apex.normalization import FusedRMSNorm

            return FusedRMSNorm(dim, eps=eps)
        if choice.name in ("te.LayerNorm", "te.RMSNorm"):
            import transformer_engine.pytorch as te

            return getattr(te, choice.name[3:])(dim, eps=eps)
    except Exception as err:  # found by find_spec but unusable (wrong build, ABI): the reference still works
        log.warning("%s unusable (%s); using the torch reference", choice.name, err)
    return nn.LayerNorm(dim, eps=eps) if slot == "layernorm" else nn.RMSNorm(dim, eps=eps)


def build_layernorm(dim: int, eps: float = 1e-5, force_reference: bool | None = None) -> nn.Module:
    return _norm("layernorm", dim, eps, force_reference)


def build_rmsnorm(dim: int, eps: float = 1e-6, force_reference: bool | None = None) -> nn.Module:
    return _norm("rmsnorm", dim, eps, force_reference)


def build_optimizer(param_groups: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0,
                    force_reference: bool | None = None) -> torch.optim.Optimizer:
    """Decoupled-weight-decay Adam (AdamW) from the chosen implementation; parameters off CUDA get the reference."""
    groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in param_groups]
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    choice = resolve("adamw", force_reference)
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if choice.fused and params and all(p.is_cuda for p in params):  # torch's fused AdamW is a CUDA kernel
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    # foreach=False: the plain per-tensor loop is the reference the fused kernels are checked against.
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def megatron_layer_spec_name(force_reference: bool | None = None) -> str:
    """"transformer_engine" (get_gpt_layer_with_transformer_engine_spec) or "local" (get_gpt_layer_local_spec)."""
    return resolve("megatron_layer_spec", force_reference).name
