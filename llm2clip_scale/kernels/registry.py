"""One registry deciding, per kernel slot, whether a fused implementation or the torch reference runs.

Detection only asks ``importlib.util.find_spec`` and ``torch.cuda`` (never imports apex / Transformer Engine /
flash-attn), and never raises: a broken probe means "reference". ``LLM2CLIP_DISABLE_FUSED`` (``1``/``all``, or a
comma list of slots) or ``force_reference=True`` pins the reference, which is how numerics are compared.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DISABLE_ENV = "LLM2CLIP_DISABLE_FUSED"
SLOTS = ("layernorm", "rmsnorm", "adamw", "attention", "megatron_layer_spec")
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 (package and SDPA backend) needs Ampere or newer


@dataclass(frozen=True)
class KernelChoice:
    slot: str
    name: str
    fused: bool
    reason: str


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


# Fused candidates per slot, best first: (name, package that provides it; "torch" is always there). All are CUDA
# kernels. Attention has its own rules (capability, SDPA backend switches) in _resolve_attention.
CANDIDATES: dict[str, tuple[tuple[str, str], ...]] = {
    "layernorm": (("apex.FusedLayerNorm", "apex"), ("te.LayerNorm", "transformer_engine")),
    "rmsnorm": (("apex.FusedRMSNorm", "apex"), ("te.RMSNorm", "transformer_engine")),
    "adamw": (("apex.FusedAdam", "apex"), ("deepspeed.FusedAdam", "deepspeed"), ("torch.AdamW(fused)", "torch")),
    "attention": (("flash_attn", "flash_attn"), ("sdpa_flash", "torch"), ("sdpa_efficient", "torch")),
    "megatron_layer_spec": (("transformer_engine", "transformer_engine"),),
}
REFERENCE = {"layernorm": "torch.nn.LayerNorm", "rmsnorm": "torch.nn.RMSNorm", "adamw": "torch.optim.AdamW",
             "attention": "sdpa_math", "megatron_layer_spec": "local"}


def resolve(slot: str, force_reference: bool | None = None) -> KernelChoice:
    """The implementation ``slot`` uses here, with the reason; candidates are tried best first."""
    if slot not in SLOTS:
        raise KeyError(f"unknown kernel slot {slot!r}; known: {', '.join(SLOTS)}")
    disabled = _disabled(slot, force_reference)
    if disabled:
        return KernelChoice(slot, REFERENCE[slot], False, disabled)
    cuda, cuda_why = _cuda()
    if slot == "attention":
        return _resolve_attention(cuda, cuda_why, _present("flash_attn"))
    present = [(name, pkg) for name, pkg in CANDIDATES[slot] if pkg == "torch" or _present(pkg)]
    if present and cuda:
        name, pkg = present[0]
        return KernelChoice(slot, name, True, f"{pkg} installed, {cuda_why}")
    # Say everything that is missing, so `env` tells what to install as well as that a GPU is needed.
    missing = [pkg for _, pkg in CANDIDATES[slot] if pkg != "torch" and not _present(pkg)]
    reasons = ([f"{', '.join(missing)} not installed"] if missing else []) + ([] if cuda else [cuda_why])
    return KernelChoice(slot, REFERENCE[slot], False, "; ".join(reasons))


def _resolve_attention(cuda: bool, cuda_why: str, has_flash_attn: bool) -> KernelChoice:
    if not cuda:
        why = cuda_why if has_flash_attn else f"flash_attn not installed; {cuda_why}"
        return KernelChoice("attention", "sdpa_math", False, why)
    try:
        capability = torch.cuda.get_device_capability(0)
        flash_on = torch.backends.cuda.flash_sdp_enabled()
        efficient_on = torch.backends.cuda.mem_efficient_sdp_enabled()
    except Exception as err:  # only a broken driver gets here; it must not stop the run
        return KernelChoice("attention", "sdpa_math", False, f"CUDA probe failed ({err})")
    cap = f"{capability[0]}.{capability[1]}"
    if capability < FLASH_MIN_CAPABILITY:
        why = f"CUDA capability {cap} < 8.0 required by flash attention"
        if efficient_on:
            return KernelChoice("attention", "sdpa_efficient", True, why)
        return KernelChoice("attention", "sdpa_math", False, f"{why}; SDPA mem-efficient backend disabled")
    if has_flash_attn:
        return KernelChoice("attention", "flash_attn", True, f"flash_attn installed, CUDA capability {cap}")
    if flash_on:
        why = f"flash_attn not installed; torch SDPA flash, CUDA capability {cap}"
        return KernelChoice("attention", "sdpa_flash", True, why)
    if efficient_on:
        return KernelChoice("attention", "sdpa_efficient", True, "SDPA flash backend disabled in torch")
    return KernelChoice("attention", "sdpa_math", False, "SDPA flash and mem-efficient backends disabled in torch")


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


def _fused_adamw(name: str) -> type[torch.optim.Optimizer] | None:
    if name == "apex.FusedAdam":
        from apex.optimizers import FusedAdam

        return FusedAdam
    if name == "deepspeed.FusedAdam":
        from deepspeed.ops.adam import FusedAdam as DSFusedAdam

        return DSFusedAdam
    return None


def build_optimizer(param_groups: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0,
                    force_reference: bool | None = None) -> torch.optim.Optimizer:
    """Decoupled-weight-decay Adam (AdamW) from the chosen implementation; parameters off CUDA get the reference."""
    groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in param_groups]
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    choice = resolve("adamw", force_reference)
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if choice.fused and params and all(p.is_cuda for p in params):  # every fused AdamW is a CUDA kernel
        names = [name for name, _ in CANDIDATES["adamw"]]
        for name in names[names.index(choice.name):]:  # the chosen one, then the next best
            try:
                fused = _fused_adamw(name)
                if fused is not None:
                    return fused(groups, adam_w_mode=True, **kwargs)
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except Exception as err:  # e.g. DeepSpeed cannot JIT-build its op on this node
                log.warning("%s unusable (%s); trying the next AdamW", name, err)
    # foreach=False: the plain per-tensor loop is the reference the fused kernels are checked against.
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


@functools.lru_cache(maxsize=4)
def _attention_choice(force_reference: bool, env: str) -> KernelChoice:  # env keys the cache on the override
    return resolve("attention", force_reference)


def clear_cache() -> None:
    """Forget the cached attention choice (tests that fake devices or packages)."""
    _attention_choice.cache_clear()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout: float = 0.0, force_reference: bool | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [+ mask]) v over [batch, heads, seq, head_dim]; a boolean mask is True = attend."""
    choice = _attention_choice(bool(force_reference), os.environ.get(DISABLE_ENV, ""))
    if choice.name == "flash_attn" and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        # flash-attn takes [batch, seq, heads, head_dim] and supports no arbitrary mask (those go through SDPA).
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout)
        return out.transpose(1, 2)
    if choice.fused:  # torch dispatches to flash / mem-efficient whenever the inputs allow
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the unfused softmax(QK^T)V: the numerics reference, and CPU-exact
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def megatron_layer_spec_name(force_reference: bool | None = None) -> str:
    """"transformer_engine" (get_gpt_layer_with_transformer_engine_spec) or "local" (get_gpt_layer_local_spec)."""
    return resolve("megatron_layer_spec", force_reference).name
