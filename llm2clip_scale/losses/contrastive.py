"""Symmetric InfoNCE over features gathered across the world, in local-loss form.

Each rank contributes its b local features exactly once. It scores its own b rows against all B = sum(b) gathered
columns (b x B logits instead of B x B), and gradients flow back through the gather to the rank that produced each
feature. Averaged over ranks (as data-parallel gradient averaging does) this equals the loss over the concatenated
global batch; tests/test_losses.py checks values and gradients against that single-process reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm2clip_scale.distributed.collectives import all_gather_rows


def gather_with_grad(features: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """Gather every rank's features with autograd back to their owners; return them and this rank's offset."""
    return all_gather_rows(features, group, differentiable=True)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE for L2-normalised features; ``logit_scale`` is the multiplier (already exponentiated)."""
    all_images, offset = gather_with_grad(image_features, group)
    all_texts, _ = gather_with_grad(text_features, group)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
