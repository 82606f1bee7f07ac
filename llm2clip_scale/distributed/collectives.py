"""Collectives the libraries do not offer in the shape we need: all-gather of rows when ranks hold different counts.

Host synchronisation is the cost to watch: on a GPU every read of a device value (``.item()``, ``.tolist()``) waits
for all the work queued before it. Ranks may hold different row counts (last eval batch, uneven captions), which then
have to be exchanged and read once; a training step, whose micro-batches have one fixed size on every rank, declares
so with :func:`equal_row_counts` and its gathers exchange nothing and read nothing (tests/test_step_syncs.py counts).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

_EQUAL_ROWS: contextvars.ContextVar[bool] = contextvars.ContextVar("llm2clip_equal_rows", default=False)


@contextlib.contextmanager
def equal_row_counts() -> Iterator[None]:
    """Within this block every rank passes the same number of rows to :func:`all_gather_rows` / :func:`row_counts`.

    The caller vouches for it (a training micro-batch: the loader's stream yields exactly ``train.micro_batch`` rows
    on every rank); the counts are then not exchanged. A rank breaking the promise makes the collective fail or hang,
    so evaluation and anything else with uneven rows stays outside.
    """
    token = _EQUAL_ROWS.set(True)
    try:
        yield
    finally:
        _EQUAL_ROWS.reset(token)


def row_counts(rows: int, device: torch.device, group: dist.ProcessGroup | None = None,
               equal_rows: bool | None = None) -> list[int]:
    """Every rank's row count, in rank order. ``equal_rows`` (default: inside :func:`equal_row_counts`) skips the
    exchange; otherwise one all-gather and one host read of all counts together."""
    world = dist.get_world_size(group)
    if _EQUAL_ROWS.get() if equal_rows is None else equal_rows:
        return [rows] * world
    count = torch.tensor([rows], dtype=torch.long, device=device)
    counts = torch.empty(world, dtype=torch.long, device=device)
    dist.all_gather_single(counts, count, group=group)
    return counts.tolist()  # one read for all ranks, not one per rank


def all_gather_rows(
    rows: torch.Tensor, group: dist.ProcessGroup | None = None, differentiable: bool = False,
    equal_rows: bool | None = None,
) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's ``rows`` along dim 0 in rank order; return them and this rank's row offset.

    Ranks may hold different numbers of rows, which torch's all_gather does not allow, so counts are exchanged first
    and rows zero-padded for the collective — unless ``equal_rows`` (see :func:`row_counts`). With ``differentiable``
    the gradient of each gathered row flows back to the rank that owns it (summed over the ranks that used it).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return rows, 0
    world = dist.get_world_size(group)
    counts = row_counts(rows.shape[0], rows.device, group, equal_rows)
    longest = max(counts)
    padded = rows if longest == rows.shape[0] else F.pad(rows, [0, 0] * (rows.dim() - 1) + [0, longest - len(rows)])
    if differentiable:
        gathered = _GatherRowsWithGrad.apply(padded.contiguous(), group)
    else:
        gathered = torch.empty((world * longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        dist.all_gather_single(gathered, padded.contiguous(), group=group)
    rank = dist.get_rank(group)
    if all(n == longest for n in counts):
        return gathered, rank * longest
    parts = gathered.split(longest)
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0), sum(counts[:rank])


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each row's gradient over the ranks and hands it to its owner.

    Written by hand rather than taken from torch's functional collective (``funcol.all_gather_single``): on gloo its
    backward runs torch's asynchronous all-reduce-then-chunk stand-in for reduce-scatter, and that path crashed a rank
    natively (SIGSEGV in the backward, twice in CI over ~10 suites, never alone). Here every collective is synchronous
    on tensors this function owns, and on gloo the all-reduce is explicit — the same traffic gloo's stand-in moves.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, rows: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        gathered = rows.new_empty((dist.get_world_size(group) * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_single(gathered, rows, group=group)
        return gathered

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = ctx.group
        return sum_to_row_owners(grad, group, reduce_scatter=dist.get_backend(group) != dist.Backend.GLOO), None


def sum_to_row_owners(rows: torch.Tensor, group: dist.ProcessGroup | None, reduce_scatter: bool) -> torch.Tensor:
    """Sum ``rows`` (every rank's, equal shapes) over the ranks and return this rank's block of ``1/world`` of them.

    ``reduce_scatter`` moves half the bytes of the all-reduce (NCCL); gloo has no reduce-scatter of its own.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    block = rows.shape[0] // world
    if reduce_scatter:
        mine = rows.new_empty((block, *rows.shape[1:]))
        dist.reduce_scatter_tensor(mine, rows.contiguous(), group=group)
        return mine
    summed = rows.contiguous().clone()
    dist.all_reduce(summed, group=group)
    return summed[rank * block:(rank + 1) * block].clone()


def gather_in_sample_order(index: torch.Tensor, *rows: torch.Tensor,
                           equal_rows: bool | None = None) -> tuple[torch.Tensor, ...]:
    """Gather each tensor of ``rows`` over the world and sort the rows by ``index`` (their global sample numbers).

    Evaluation splits a held-out set over ranks; this puts every rank's rows back in one order known to all ranks.
    ``equal_rows``: as for :func:`all_gather_rows`.
    """
    order = torch.argsort(all_gather_rows(index, equal_rows=equal_rows)[0])
    return tuple(all_gather_rows(part, equal_rows=equal_rows)[0][order] for part in rows)


def sum_over_ranks(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    """An integer summed over the ranks of ``group`` (the world by default); every rank gets the total."""
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())
