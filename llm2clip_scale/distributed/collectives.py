"""Collectives the libraries do not offer in the shape we need: all-gather of rows when ranks hold different counts."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def all_gather_rows(
    rows: torch.Tensor, group: dist.ProcessGroup | None = None, differentiable: bool = False
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``rows`` along dim 0 in rank order; return them and this rank's row offset.

    Ranks may hold different numbers of rows (last eval batch, uneven captions), which torch's all_gather does not
    allow, so counts are exchanged first and rows zero-padded for the collective. With ``differentiable`` the
    gradient of each gathered row flows back to the rank that owns it (summed over the ranks that used it).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return rows, 0
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts_t = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count, group=group)
    counts = [int(c.item()) for c in counts_t]
    pad = [0, 0] * (rows.dim() - 1) + [0, max(counts) - rows.shape[0]]
    padded = F.pad(rows, pad)
    if differentiable:
        # torch's functional collective carries autograd (backward = reduce-scatter of the gradients); it is the
        # replacement torch names for the deprecated torch.distributed.nn.functional.all_gather.
        group = group if group is not None else dist.group.WORLD
        parts = funcol.all_gather_single(padded.contiguous(), 0, group).chunk(world, dim=0)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
    rank = dist.get_rank(group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0), sum(counts[:rank])


def gather_in_sample_order(index: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather each tensor of ``rows`` over the world and sort the rows by ``index`` (their global sample numbers).

    Evaluation splits a held-out set over ranks; this puts every rank's rows back in one order known to all ranks.
    """
    order = torch.argsort(all_gather_rows(index)[0])
    return tuple(all_gather_rows(part)[0][order] for part in rows)


def sum_over_ranks(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    """An integer summed over the ranks of ``group`` (the world by default); every rank gets the total."""
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())
