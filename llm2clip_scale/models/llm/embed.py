"""The one path that embeds text with the (TP x PP sharded) LLM tower: token rows in, mean-pooled vectors out.

Under a pipeline the rows go through megatron's schedule (``get_forward_backward_func``: 1F1B over p2p; the last
stage holds the pooled vectors and broadcasts them over its pipeline group); at PP = 1 micro-batches of any shape
call the tower directly. Rows carry a pooling mask beside the attention mask:
instructions and chat-format scaffolding are attended to but not averaged (``data/prompts.py`` builds the masks).

Two contracts, by who holds which captions:

- :func:`embed_texts`: every rank of the model-parallel group holds the *same* rows (stage 1, offline sidecars);
- :func:`embed_local_batch`: every rank holds its *own* rows (colocated stage 2, ProCLIP, CRA over the world): the
  group pools its captions, embeds the union once and every rank keeps its own rows — one tower pass per
  model-parallel group, each caption embedded exactly once.

:func:`backprop_local_batch` is the gradient half of the second (stage 2 with a trainable LoRA); stage 1's gradient
cache and MNTP drive :func:`run_schedule` themselves.

Length bucketing (the second contract, PP = 1): a group's captions mix short alt-texts with long dense captions, and
one batch padded to the longest would spend most of the tower's work on padding. The rows are sorted by length and
cut into chunks of similar length (:func:`length_buckets`), each chunk trimmed to its own longest row, and the
vectors put back in row order. Padding is masked out of attention and pooling, so a row's vector does not depend on
its chunk (to float rounding; tests/test_step_syncs.py checks 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor, nn

from llm2clip_scale.distributed.collectives import all_gather_rows

# What one more tower call costs, in token positions: a forward reads every weight once whatever its token count, and
# a GPU does about as many FLOPs in that time as 200-300 tokens need (H100/H200/B200 bf16: peak FLOP/s over HBM
# bytes/s, times 2 bytes per parameter / 2 FLOPs per parameter and token). 512 adds launch latency on top.
CHUNK_OVERHEAD_POSITIONS = 512


@dataclass
class TextBatch:
    """Right-padded token rows (n, L): ids, attention mask (1 = token) and pooling mask (1 = averaged)."""

    input_ids: Tensor
    attention_mask: Tensor
    pool_mask: Tensor

    @classmethod
    def of(cls, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor | None = None) -> TextBatch:
        """A batch whose pooling mask defaults to the attention mask (every token averaged)."""
        return cls(input_ids, attention_mask, attention_mask if pool_mask is None else pool_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def select(self, rows: slice | Tensor) -> TextBatch:
        return TextBatch(self.input_ids[rows], self.attention_mask[rows], self.pool_mask[rows])

    def padded_to(self, length: int) -> TextBatch:
        pad = length - self.length
        return TextBatch(*(F.pad(t, (0, pad)) for t in (self.input_ids, self.attention_mask, self.pool_mask)))

    def trimmed(self) -> TextBatch:
        """Without the columns that are padding in every row (the tower's output does not depend on them)."""
        length = max(int(self.attention_mask.sum(dim=1).max().item()), 1) if len(self) else 1
        return TextBatch(self.input_ids[:, :length], self.attention_mask[:, :length], self.pool_mask[:, :length])

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pool_mask.to(device))


def concat_texts(parts: Sequence[TextBatch]) -> TextBatch:
    """Stack several TextBatches (e.g. queries, positives, negatives) row-wise, padded to the longest."""
    length = max(part.length for part in parts)
    padded = [part.padded_to(length) for part in parts]
    return TextBatch(*(torch.cat(tensors) for tensors in zip(*((p.input_ids, p.attention_mask, p.pool_mask)
                                                                  for p in padded))))


def split_micro_batches(texts: TextBatch, micro_batch_size: int, uniform: bool) -> tuple[list[TextBatch], int]:
    """Cut ``texts`` into micro-batches of ``micro_batch_size`` rows; return them and the number of filler rows.

    ``uniform`` (PP > 1): megatron's p2p buffers have one (L, mb, hidden) shape, so every micro-batch keeps the
    full length and the last one is filled up with copies of row 0 (real tokens, so no all-masked softmax rows;
    callers drop their outputs and give them no gradient). Otherwise each micro-batch is trimmed to its own longest
    row and the last may be short.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n = len(texts)
    fill = 0
    if uniform:
        fill = math.ceil(n / micro_batch_size) * micro_batch_size - n
        if fill:
            rows = torch.cat([torch.arange(n), torch.zeros(fill, dtype=torch.long)])
            texts = texts.select(rows)
    chunks = [texts.select(slice(start, start + micro_batch_size)) for start in range(0, len(texts), micro_batch_size)]
    if not uniform:
        chunks = [chunk.trimmed() for chunk in chunks]
    return chunks, fill


def length_buckets(lengths: Sequence[int], overhead: int = CHUNK_OVERHEAD_POSITIONS) -> tuple[list[int], list[int]]:
    """(order, sizes): row indices sorted by length, longest first (stable), and the sizes of the consecutive chunks
    of that order that minimise the positions a tower computes — over chunks, rows x the chunk's longest row, plus
    ``overhead`` positions per chunk (exact dynamic programme)."""
    if not lengths:
        return [], []
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    ordered = np.asarray([lengths[row] for row in order], dtype=np.int64)
    # Chunks need only start where a run of equal lengths starts: moving a boundary back to the run's start moves
    # rows into the next chunk at the same cost per row there and at no less in the previous one. At most
    # max_text_len distinct lengths, so the programme stays small whatever the row count.
    bounds = np.r_[np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]), len(ordered)]
    best = np.zeros(len(bounds))  # best[e]: least cost of the rows before bounds[e]
    last = np.zeros(len(bounds), dtype=np.int64)  # where the last chunk of that optimum starts
    for end in range(1, len(bounds)):
        cost = best[:end] + (bounds[end] - bounds[:end]) * ordered[bounds[:end]] + overhead
        last[end] = int(np.argmin(cost))
        best[end] = cost[last[end]]
    sizes, end = [], len(bounds) - 1
    while end > 0:
        sizes.append(int(bounds[end] - bounds[last[end]]))
        end = int(last[end])
    return order, sizes[::-1]


def _bucketed_chunks(texts: TextBatch, lengths: Sequence[int]) -> tuple[Tensor, list[TextBatch]]:
    """``texts`` cut by :func:`length_buckets`, each chunk trimmed to its longest row (known: no device read); and
    the row order (chunk rows concatenated = ``texts.select(order)``)."""
    order, sizes = length_buckets(lengths)
    # Built on the host and copied without waiting (torch.tensor(..., device=cuda) would synchronise).
    index = torch.tensor(order).to(texts.input_ids.device, non_blocking=True)
    chunks, start = [], 0
    for rows in index.split(sizes):
        width = max(lengths[order[start]], 1)  # the chunk's first row is its longest
        chunks.append(TextBatch(*(t[rows, :width] for t in (texts.input_ids, texts.attention_mask, texts.pool_mask))))
        start += len(rows)
    return index, chunks


@torch.no_grad()
def _embed_by_length(tower: nn.Module, texts: TextBatch, lengths: Sequence[int]) -> Tensor:
    """:func:`embed_texts` at PP = 1, in length buckets; vectors in ``texts``' row order."""
    if len(texts) == 0:
        return embed_texts(tower, texts)
    order, chunks = _bucketed_chunks(texts, lengths)
    vectors = torch.cat([tower(chunk.input_ids, chunk.attention_mask, chunk.pool_mask) for chunk in chunks]).float()
    return torch.empty_like(vectors).index_copy_(0, order, vectors)


def run_schedule(
    tower: nn.Module,
    chunks: list[TextBatch],
    loss_func: Callable[[int, Tensor], tuple[Tensor, dict]] | None,
    forward_only: bool,
    return_hidden_states: bool = False,
) -> list:
    """Drive ``chunks`` through megatron's schedule. ``loss_func(i, output)`` makes micro-batch i's loss on the last
    stage; without it (forward-only) the last stage's outputs are collected as they are. The last stage outputs
    pooled embeddings, or the final token states with ``return_hidden_states`` (MNTP)."""
    order: Iterator[int] = iter(range(len(chunks)))

    def keep_output(output: Tensor, non_loss_data: bool = True) -> Tensor:
        return output

    def forward_step(data_iterator: Iterator[int], model: nn.Module) -> tuple[Tensor, Callable]:
        index = next(data_iterator)
        chunk = chunks[index]
        output = model(chunk.input_ids, chunk.attention_mask, chunk.pool_mask,
                       return_hidden_states=return_hidden_states)
        if loss_func is None:
            return output, keep_output
        return output, lambda out: loss_func(index, out)

    # collect_non_loss_data hands the last stage's outputs back untouched (the loss path would divide them by
    # num_microbatches in place).
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=order,
        model=[tower],
        num_microbatches=len(chunks),
        seq_length=chunks[0].length,
        micro_batch_size=len(chunks[0]),
        forward_only=forward_only,
        collect_non_loss_data=loss_func is None,
    )


def broadcast_from_last_stage(tensor: Tensor) -> Tensor:
    """``tensor`` as the last pipeline stage holds it, on every stage of the pipeline group (no-op at PP = 1)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def _pipelined() -> bool:
    return (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_pipeline_model_parallel_world_size() > 1)


@torch.no_grad()
def embed_texts(tower: nn.Module, texts: TextBatch, micro_batch_size: int | None = None,
                broadcast: bool = True) -> Tensor | None:
    """Pooled (n, hidden) float32 embeddings of ``texts``, ``micro_batch_size`` rows at a time (default: all at
    PP = 1, PP micro-batches under a pipeline — the fewest that keep every stage busy).

    Every rank of the model-parallel group must call with the same ``texts``. The last pipeline stage computes them;
    with ``broadcast`` they are sent to the other stages too, else those get None. Honours the tower's mode
    (training mode draws dropout masks).
    """
    pipelined = _pipelined()
    hidden = tower.config.hidden_size
    if len(texts) == 0:
        return torch.empty(0, hidden, dtype=torch.float32, device=texts.input_ids.device)
    stages = parallel_state.get_pipeline_model_parallel_world_size() if pipelined else 1
    micro_batch_size = micro_batch_size or math.ceil(len(texts) / stages)
    chunks, _ = split_micro_batches(texts, micro_batch_size, uniform=pipelined)
    if pipelined:
        outputs = run_schedule(tower, chunks, None, forward_only=True)
    else:  # the no-pipelining schedule would only loop over the chunks; this also runs without parallel_state
        outputs = [tower(chunk.input_ids, chunk.attention_mask, chunk.pool_mask) for chunk in chunks]
    if not pipelined or parallel_state.is_pipeline_last_stage():
        embeddings = torch.cat(outputs, dim=0)[: len(texts)].float().contiguous()
    elif broadcast:
        embeddings = torch.empty(len(texts), hidden, dtype=torch.float32, device=texts.input_ids.device)
    else:
        return None
    return broadcast_from_last_stage(embeddings) if broadcast else embeddings


def _row_lengths(texts: TextBatch) -> list[int]:
    return texts.attention_mask.sum(dim=1).tolist()  # one host read for all rows


def _gather_texts(texts: TextBatch, group: dist.ProcessGroup) -> tuple[TextBatch, int, list[int]]:
    """The group's rows in rank order, padded to the group's longest, this rank's row offset and every row's length.

    The lengths come first (one small gather, one host read: the union's width and the bucket plan); the token rows
    follow in one gather of ids and both masks, (b, 3, L_max), that nothing waits for.
    """
    lengths = all_gather_rows(texts.attention_mask.sum(dim=1), group=group)[0].tolist()
    width = max(max(lengths, default=1), 1)
    # Right padding is masked and so cannot change an embedding; columns past every row's end carry none.
    if texts.length > width:
        texts = TextBatch(texts.input_ids[:, :width], texts.attention_mask[:, :width], texts.pool_mask[:, :width])
    texts = texts.padded_to(width)
    packed = torch.stack([texts.input_ids.long(), texts.attention_mask.long(), texts.pool_mask.long()], dim=1)
    gathered, offset = all_gather_rows(packed, group=group)
    return TextBatch(gathered[:, 0], gathered[:, 1], gathered[:, 2]), offset, lengths


@torch.no_grad()
def embed_local_batch(
    tower: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    tp_group: dist.ProcessGroup | None,
    micro_batch_size: int | None = None,
    pool_mask: Tensor | None = None,
) -> Tensor:
    """Embed this rank's (b, L) right-padded captions with the sharded ``tower``; return (b, hidden) float32.

    Ranks may hold different b (even 0) and L. Collective: with PP = 1 over ``tp_group`` (None or size 1: this
    rank's rows alone); with PP > 1 over megatron's whole model-parallel group (TP x PP), whatever ``tp_group`` is,
    since every stage must run the same micro-batches. ``pool_mask`` defaults to the attention mask.
    """
    texts = TextBatch.of(input_ids, attention_mask, pool_mask)
    pipelined = _pipelined()
    group = parallel_state.get_model_parallel_group() if pipelined else tp_group
    # Length buckets at PP = 1 unless the caller fixed the micro-batch size; a pipeline needs one shape throughout.
    bucketed = not pipelined and micro_batch_size is None
    if group is None or dist.get_world_size(group) == 1:
        return _embed_by_length(tower, texts, _row_lengths(texts)) if bucketed else embed_texts(
            tower, texts, micro_batch_size)
    union, offset, lengths = _gather_texts(texts, group)
    vectors = _embed_by_length(tower, union, lengths) if bucketed else embed_texts(tower, union, micro_batch_size)
    return vectors[offset : offset + len(texts)]


def backprop_local_batch(
    tower: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    pool_mask: Tensor | None,
    grad: Tensor,
    tp_group: dist.ProcessGroup | None,
    micro_batch_size: int | None = None,
) -> None:
    """The gradient half of :func:`embed_local_batch`: accumulate into the tower's trainable parameters the gradient
    of ``sum(embedding · grad)`` over every rank's rows, where ``grad`` (b, hidden) is d(loss)/d(this rank's
    embeddings). Same groups and collectives as :func:`embed_local_batch`, called with the same captions.

    Gradient caching (``train/grad_cache.py`` explains it): the embeddings came from a pass without autograd; this
    pass re-embeds the group's union with autograd and back-propagates the surrogate, through the pipeline schedule
    when PP > 1. Every member of the group needs the whole union's gradient (the TP shards of one tower must
    back-propagate the same output gradient), so the rows' gradients are gathered like the rows themselves. The
    tower must be deterministic (eval mode: no dropout), or this pass would differentiate another function.
    """
    texts = TextBatch.of(input_ids, attention_mask, pool_mask)
    pipelined = _pipelined()
    group = parallel_state.get_model_parallel_group() if pipelined else tp_group
    grad = grad.float()
    lengths = None
    if group is not None and dist.get_world_size(group) > 1:
        texts, _, lengths = _gather_texts(texts, group)
        grad, _ = all_gather_rows(grad.contiguous(), group=group)
    if len(texts) == 0:
        return
    if not pipelined and micro_batch_size is None:  # the same length buckets as embed_local_batch's pass
        order, chunks = _bucketed_chunks(texts, _row_lengths(texts) if lengths is None else lengths)
        grads = grad[order].split([len(chunk) for chunk in chunks])
    else:
        stages = parallel_state.get_pipeline_model_parallel_world_size() if pipelined else 1
        chunks, fill = split_micro_batches(texts, micro_batch_size or math.ceil(len(texts) / stages),
                                           uniform=pipelined)
        if fill:  # filler rows (copies of row 0) get no gradient
            grad = torch.cat([grad, grad.new_zeros(fill, grad.shape[1])])
        grads = grad.split([len(chunk) for chunk in chunks])
    count = len(chunks)

    def surrogate(index: int, output: Tensor) -> tuple[Tensor, dict]:
        # The schedule divides each micro-batch's loss by the micro-batch count; multiply it back.
        return (output.float() * grads[index]).sum() * count, {}

    run_schedule(tower, chunks, surrogate, forward_only=False)


__all__ = ["TextBatch", "backprop_local_batch", "broadcast_from_last_stage", "concat_texts", "embed_local_batch",
           "embed_texts", "length_buckets", "run_schedule", "split_micro_batches"]
