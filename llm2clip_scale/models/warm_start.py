"""Warm starts for the stage-2 model from ProCLIP artefacts: the stage-1 adapter and a pretrained vision projection.

- ``adapter.safetensors`` (written by ProCLIP stage 1): the LLMAdapter's own state dict, with its shape in the
  safetensors metadata so a mismatching ``model.adapter`` config fails with the sizes named, not a key dump.
- The vision projection: a timm-format vision file whose ``head.weight``/``head.bias`` are the CLIP image projection
  (as ``data_prep/train_reference_clip.py`` writes it). The trunk loader drops ``head.*`` on purpose (LLM2CLIP
  re-initialises it), but ProCLIP stage 2 needs the pretrained projection: the stage-1 adapter was distilled into
  the reference CLIP's joint space, and a fresh head would throw that alignment away.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_META_KEY = "llm2clip_scale.adapter"


def save_adapter(adapter: nn.Module, path: str | os.PathLike[str], meta: dict | None = None) -> None:
    """Write ``adapter``'s state dict (fp32, contiguous) to ``path`` with ``meta`` (shape info) as metadata."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(state, str(path), metadata={ADAPTER_META_KEY: json.dumps(meta or {})})


def read_adapter_meta(path: str | os.PathLike[str]) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get(ADAPTER_META_KEY, "{}"))


def load_adapter(adapter: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a stage-1 ``adapter.safetensors`` into ``adapter`` strictly (every key, every shape)."""
    state = load_file(str(path), device="cpu")
    own = adapter.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise ValueError(
            f"model.adapter_init: {str(path)!r} (written for {read_adapter_meta(path) or 'an unknown adapter'}) does "
            f"not fit model.adapter: shapes {bad[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}; use the "
            "same model.adapter and model.embed_dim as the stage-1 run"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def load_vision_head(head: nn.Linear, path: str | os.PathLike[str]) -> None:
    """Copy ``head.weight``/``head.bias`` of a timm-format vision file into the tower's projection ``head``."""
    from llm2clip_scale.models.vision.pretrained import read_checkpoint

    state = read_checkpoint(path)
    weight, bias = state.get("head.weight"), state.get("head.bias")
    if weight is None:
        raise ValueError(f"model.vision_head_init: {str(path)!r} holds no head.weight (the CLIP image projection)")
    if tuple(weight.shape) != tuple(head.weight.shape):
        raise ValueError(
            f"model.vision_head_init: head.weight {tuple(weight.shape)} in {str(path)!r} vs tower head "
            f"{tuple(head.weight.shape)} (embed_dim x trunk width); set model.embed_dim to the CLIP's projection size"
        )
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
