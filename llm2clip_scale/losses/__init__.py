"""Contrastive objectives over world-gathered features, behind one calling convention.

Every loss built here is called as ``loss(image_features, text_features, logit_scale, logit_bias=None, group=None)``
with L2-normalised features and ``logit_scale`` already exponentiated, and returns this rank's local loss; averaging
it over ranks (as data-parallel gradient averaging does) gives the global-batch loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from llm2clip_scale.losses.contrastive import clip_loss, gather_with_grad
from llm2clip_scale.losses.siglip import siglip_loss
from llm2clip_scale.losses.tiled import DEFAULT_TILE_SIZE, tiled_clip_loss

LOSS_NAMES: tuple[str, ...] = ("infonce", "infonce_tiled", "siglip")


class ContrastiveLoss(Protocol):
    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor: ...


def _without_bias(name: str, fn: Callable[..., torch.Tensor]) -> ContrastiveLoss:
    def loss(
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        # A bias reaching a softmax loss means the model was configured for SigLIP; dropping it silently would leave
        # a parameter without gradient.
        if logit_bias is not None:
            raise ValueError(f"loss {name!r} takes no logit_bias (softmax is shift-invariant); use 'siglip'")
        return fn(image_features, text_features, logit_scale, group=group)

    loss.__name__ = name
    return loss


def _siglip(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    return siglip_loss(image_features, text_features, logit_scale, logit_bias, group=group)


def build_contrastive_loss(name: str, tile_size: int = DEFAULT_TILE_SIZE) -> ContrastiveLoss:
    """The loss called ``name``: "infonce" (gathered local-loss InfoNCE), "infonce_tiled" (same, ``tile_size`` local
    rows at a time, gradients formed in forward) or "siglip" (ring-exchanged sigmoid loss)."""
    if name == "infonce":
        return _without_bias(name, clip_loss)
    if name == "infonce_tiled":
        return _without_bias(name, functools.partial(tiled_clip_loss, tile_size=tile_size))
    if name == "siglip":
        return _siglip
    raise ValueError(f"unknown contrastive loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")


__all__ = [
    "LOSS_NAMES",
    "ContrastiveLoss",
    "build_contrastive_loss",
    "clip_loss",
    "gather_with_grad",
    "siglip_loss",
    "tiled_clip_loss",
]
