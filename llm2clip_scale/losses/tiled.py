"""Symmetric InfoNCE in local-loss form that never materialises the b x B logit matrix.

clip_loss keeps two b x B logit matrices (and their softmax) alive for backward; with large global batches that is
the largest activation of the step. Cross-entropy only needs, per row, the logsumexp over the columns and the positive
logit. The logsumexp is computed over tiles of at most ``tile_size`` gathered columns, and only the features and the
b logsumexps are saved; backward recomputes each tile's logits to form the softmax weights. Peak extra memory is one
b x tile_size block. Value and gradients (features, through the world gather, and logit_scale) equal clip_loss's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from llm2clip_scale.losses.contrastive import gather_with_grad

DEFAULT_TILE_SIZE = 4096


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    # At least fp32 so bf16/fp16 features do not lose the logsumexp; fp64 stays fp64 (gradcheck).
    return torch.promote_types(tensor.dtype, torch.float32)


def _tiled_logsumexp(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Row-wise logsumexp of scale * queries @ keys.T in at least fp32, one column tile at a time."""
    dtype = _accumulation_dtype(queries)
    queries_acc = queries.to(dtype)
    lse = torch.full((queries.shape[0],), float("-inf"), device=queries.device, dtype=dtype)
    for start in range(0, keys.shape[0], tile_size):
        logits = scale * (queries_acc @ keys[start : start + tile_size].to(dtype).T)
        # logaddexp merges the partial sums stably; -inf is its identity.
        lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
    return lse


class _TiledRowLogSumExp(torch.autograd.Function):
    """lse_i = log sum_j exp(scale * q_i . k_j), differentiable in queries, keys and scale."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scale: torch.Tensor,
        tile_size: int,
    ) -> torch.Tensor:
        lse = _tiled_logsumexp(queries, keys, scale.detach().to(_accumulation_dtype(queries)).reshape(()), tile_size)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.tile_size = tile_size
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, keys, scale, lse = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        scale_acc = scale.to(dtype).reshape(())
        queries_acc = queries.to(dtype)
        grad_lse = grad_lse.to(dtype)
        grad_q = torch.zeros_like(queries_acc) if need_q else None
        grad_k = torch.empty(keys.shape, device=keys.device, dtype=dtype) if need_k else None
        grad_s = torch.zeros((), device=queries.device, dtype=dtype)
        for start in range(0, keys.shape[0], ctx.tile_size):
            tile = keys[start : start + ctx.tile_size].to(dtype)
            dots = queries_acc @ tile.T
            # d lse_i / d logit_ij is the softmax weight p_ij, recomputed from the saved logsumexp; each row is
            # weighted by its upstream gradient.
            weights = torch.exp(scale_acc * dots - lse[:, None]) * grad_lse[:, None]
            if need_q:
                grad_q += scale_acc * (weights @ tile)
            if need_k:
                grad_k[start : start + ctx.tile_size] = scale_acc * (weights.T @ queries_acc)
            if need_s:
                grad_s += (weights * dots).sum()
        return (
            grad_q.to(queries.dtype) if need_q else None,
            grad_k.to(keys.dtype) if need_k else None,
            grad_s.to(scale.dtype).reshape(scale.shape) if need_s else None,
            None,
        )


def tiled_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Drop-in for clip_loss (L2-normalised features, ``logit_scale`` already exponentiated) with tiled logits."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    logit_scale = torch.as_tensor(logit_scale, device=image_features.device)
    all_images, _ = gather_with_grad(image_features, group)
    all_texts, _ = gather_with_grad(text_features, group)
    lse_per_image = _TiledRowLogSumExp.apply(image_features, all_texts, logit_scale, tile_size)
    lse_per_text = _TiledRowLogSumExp.apply(text_features, all_images, logit_scale, tile_size)
    # The positive pair of local row i is local column i in both directions; taking it from the local features rather
    # than the gathered copies gives the same value and, after the gather's backward, the same gradient.
    dtype = _accumulation_dtype(image_features)
    positives = logit_scale.to(dtype) * (image_features.to(dtype) * text_features.to(dtype)).sum(dim=-1)
    return (lse_per_image.mean() + lse_per_text.mean()) / 2 - positives.mean()
