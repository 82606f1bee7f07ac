"""Symmetric InfoNCE in local-loss form that never holds the b x B logit matrix, with its gradients formed in forward.

clip_loss keeps two b x B logit matrices (and their log-softmax) alive for backward; with large global batches that is
the largest activation of the step. The loss is the last node of the graph, so its gradients need nothing from
backward but the upstream scalar: each direction (images against the gathered texts, texts against the gathered
images) runs in forward over blocks of ``tile_size`` local rows. A block's row softmax over all B gathered columns is
exact (no running statistics), so per block there are the same three matmuls per direction as clip_loss's forward and
backward, and nothing is recomputed:

    logits  = (scale * Q_blk) @ K.T                       (tile x B, reused buffer)
    G       = (softmax(logits) - onehot(positives)) / b   (in place)
    dQ_blk  = scale * G @ K        dK += G.T @ (scale * Q_blk)        dscale += sum(Q_blk * (G @ K))

Only the gradients are saved (b x d for the queries, B x d for the gathered keys, one scalar); backward multiplies them
by the upstream gradient. What remains of the loss's memory is one tile x B block, the gathered copy of one side at a
time (the text side is gathered, used and dropped before the image side is gathered) and those gradient buffers.
Gradients of the gathered keys flow back through the world gather (a reduce-scatter) to the ranks that own them,
exactly as for clip_loss. Values and gradients equal clip_loss's (tests/test_losses_extra.py).

Arithmetic is in at least fp32 whatever the input dtype and with autocast switched off inside (the training step casts
features to fp32 before the loss; bf16 logits would make the softmax the least precise part of the step); gradients
are returned in the inputs' dtypes. The result is not twice differentiable (backward is a product with saved constants).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from llm2clip_scale.losses.contrastive import gather_with_grad

# Local rows per block: the block is tile_size x B floats (64 MB at 1024 x 16384 in fp32).
DEFAULT_TILE_SIZE = 1024


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    # At least fp32 so bf16/fp16 features do not lose the softmax; fp64 stays fp64 (gradcheck).
    return torch.promote_types(tensor.dtype, torch.float32)


def _cross_entropy_with_grads(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    tile_size: int,
    need_keys_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """mean_i CE(scale * q_i . K, target offset + i) and its gradients w.r.t. queries, keys (or None) and scale."""
    rows, columns = queries.shape[0], keys.shape[0]
    dtype = scale.dtype
    keys = keys.to(dtype)
    loss = torch.zeros((), device=queries.device, dtype=dtype)
    grad_scale = torch.zeros((), device=queries.device, dtype=dtype)
    grad_queries = torch.empty(queries.shape, device=queries.device, dtype=dtype)
    grad_keys = torch.zeros(keys.shape, device=keys.device, dtype=dtype) if need_keys_grad else None
    block = torch.empty((min(tile_size, rows), columns), device=queries.device, dtype=dtype)
    for start in range(0, rows, tile_size):
        stop = min(start + tile_size, rows)
        query_block = queries[start:stop].to(dtype)
        scaled = query_block * scale
        logits = block[: stop - start]
        torch.matmul(scaled, keys.T, out=logits)
        # Row r's positive is gathered column offset + start + r; flat indices address them in the contiguous block.
        positive = (torch.arange(stop - start, device=queries.device) * (columns + 1) + offset + start)
        positive_logits = logits.view(-1)[positive]
        row_max = logits.amax(dim=1, keepdim=True)
        logits.sub_(row_max).exp_()
        row_sum = logits.sum(dim=1, keepdim=True)
        loss += (row_max + row_sum.log()).sum() - positive_logits.sum()
        # logits becomes b * dCE/dlogits = softmax - onehot; the 1/b of the mean is applied to the d-wide products.
        logits.div_(row_sum)
        logits.view(-1)[positive] -= 1
        grad_scaled = logits @ keys
        grad_scale += torch.vdot(grad_scaled.reshape(-1), query_block.reshape(-1)) / rows
        torch.mul(grad_scaled, scale / rows, out=grad_queries[start:stop])
        if grad_keys is not None:
            grad_keys.addmm_(logits.T, scaled, alpha=1.0 / rows)
    return loss / rows, grad_queries, grad_keys, grad_scale


class _RowTiledCrossEntropy(torch.autograd.Function):
    """mean_i CE(scale * queries_i . keys.T, offset + i), its gradients computed and saved in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        queries: torch.Tensor,
        keys: torch.Tensor,
        scale: torch.Tensor,
        offset: int,
        tile_size: int,
    ) -> torch.Tensor:
        dtype = _accumulation_dtype(queries)
        with torch.autocast(queries.device.type, enabled=False):
            loss, grad_queries, grad_keys, grad_scale = _cross_entropy_with_grads(
                queries, keys, scale.detach().to(dtype).reshape(()), offset, tile_size,
                need_keys_grad=ctx.needs_input_grad[1],
            )
        ctx.dtypes = (queries.dtype, keys.dtype, scale.dtype)
        ctx.scale_shape = scale.shape
        # Intermediates, not inputs: save_for_backward releases them once backward has run.
        ctx.save_for_backward(grad_queries, grad_keys, grad_scale)
        return loss  # in the accumulation dtype: fp32 for bf16 features, as the tiled loss always returned

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_queries, grad_keys, grad_scale = ctx.saved_tensors
        query_dtype, key_dtype, scale_dtype = ctx.dtypes
        need_queries, need_keys, need_scale = ctx.needs_input_grad[:3]
        upstream = grad_loss.to(grad_scale.dtype)
        # A product, not in place: retain_graph and gradcheck run backward more than once.
        return (
            (grad_queries * upstream).to(query_dtype) if need_queries else None,
            (grad_keys * upstream).to(key_dtype) if need_keys and grad_keys is not None else None,
            (grad_scale * upstream).to(scale_dtype).reshape(ctx.scale_shape) if need_scale else None,
            None,
            None,
        )


def tiled_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Drop-in for clip_loss (L2-normalised features, ``logit_scale`` already exponentiated), ``tile_size`` local rows
    at a time; peak extra memory is one tile_size x B block plus the gathered features and their gradients."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    logit_scale = torch.as_tensor(logit_scale, device=image_features.device)
    # One gathered side at a time: the text copy is not saved by the first direction, so it is freed before the image
    # copy is gathered.
    all_texts, offset = gather_with_grad(text_features, group)
    per_image = _RowTiledCrossEntropy.apply(image_features, all_texts, logit_scale, offset, tile_size)
    del all_texts
    all_images, _ = gather_with_grad(image_features, group)
    per_text = _RowTiledCrossEntropy.apply(text_features, all_images, logit_scale, offset, tile_size)
    return (per_image + per_text) / 2
