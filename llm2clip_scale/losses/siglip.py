"""SigLIP pairwise sigmoid loss, distributed as a ring exchange of text features.

Every image-text pair is an independent binary problem (label +1 on the diagonal, -1 elsewhere), so no rank ever needs
the whole batch at once: each rank keeps its b images and the text blocks travel round the ring, one neighbour hop at a
time, for world - 1 hops. After the last hop every rank has scored its images against every text of the world, and the
sum of the local losses equals the sum over the global B x B pair matrix. The hop is an autograd Function whose backward
sends the gradient of the received block back along the reverse ring, so every text feature's gradient reaches its
owner. Peak memory per hop is one b x b logit block plus one text block in flight, and there is no collective.

Normalisation follows the paper and open_clip: loss = -sum(log sigmoid(label * logit)) / b_local. With equal local
batches the mean of the local losses (what data-parallel averaging optimises) is the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm2clip_scale.distributed.collectives import row_counts


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    # P2P ops address peers by global rank, whatever group they run in.
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
    """Send ``send`` to ``dst`` while receiving ``recv`` from ``src``; both posted before waiting so a ring never
    deadlocks."""
    ops = [
        dist.P2POp(dist.isend, send, dst, group=group),
        dist.P2POp(dist.irecv, recv, src, group=group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


class _RingShift(torch.autograd.Function):
    """Pass a block one step round the ring (to ``send_to``, from ``recv_from``); backward goes the other way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        block: torch.Tensor,
        recv_rows: int,
        send_to: int,
        recv_from: int,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        ctx.sent_shape = block.shape
        # Local batches may differ in size, so the incoming shape comes from the sizes exchanged up front.
        received = block.new_empty((recv_rows, *block.shape[1:]))
        _exchange(block.contiguous(), send_to, received, recv_from, group)
        return received

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The gradient of the block we received belongs to the rank that sent it; the gradient of the block we sent
        # arrives from the rank we sent it to.
        grad_sent = grad.new_empty(ctx.sent_shape)
        _exchange(grad.contiguous(), ctx.recv_from, grad_sent, ctx.send_to, ctx.group)
        return grad_sent, None, None, None, None


def _block_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    with_positives: bool,
) -> torch.Tensor:
    """Summed -log sigmoid(label * logit) over one image block x text block."""
    logits = logit_scale * images @ texts.T
    if logit_bias is not None:
        logits = logits + logit_bias
    if not with_positives:
        return -F.logsigmoid(-logits).sum()
    labels = 2 * torch.eye(images.shape[0], texts.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Sigmoid loss of this rank's images against the texts of every rank in ``group``.

    ``logit_scale`` is the multiplier (already exponentiated, as for clip_loss); ``logit_bias`` is added to every
    logit (None for no bias). Image i and text i of the same rank form the positive pairs.
    """
    local_rows = image_features.shape[0]
    total = _block_loss(image_features, text_features, logit_scale, logit_bias, with_positives=True)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        # Exchanged (one read) unless the caller declared equal batches (collectives.equal_row_counts).
        counts = row_counts(text_features.shape[0], text_features.device, group)
        send_to = _global_rank(group, (rank + 1) % world)
        recv_from = _global_rank(group, (rank - 1) % world)
        texts = text_features
        for hop in range(1, world):
            # After ``hop`` shifts this rank holds the texts of rank (rank - hop); none of them pair with our images.
            texts = _RingShift.apply(texts, counts[(rank - hop) % world], send_to, recv_from, group)
            total = total + _block_loss(image_features, texts, logit_scale, logit_bias, with_positives=False)
    return total / local_rows
