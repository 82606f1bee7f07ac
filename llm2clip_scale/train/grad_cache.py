"""Gradient caching for contrastive training of the (TP x PP sharded) text tower, after Gao et al. 2021
("Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

SimCSE scores every query against every caption of the global batch, so its loss does not decompose over
micro-batches, yet activations of the whole batch do not fit, and megatron's pipeline schedules only know
per-micro-batch losses. Gradient caching splits the step in two passes over the same micro-batches:

1. embed every micro-batch without autograd (activations are freed at once), compute the loss on the whole batch's
   embeddings e and its gradient g = d(loss)/d(e), which is tiny (n x hidden);
2. run every micro-batch again *with* autograd and back-propagate the surrogate Σ e_i · g_i. Its gradient with
   respect to the parameters is Σ_i (de_i/dθ)^T g_i = d(loss)/dθ, exactly the full-batch gradient.

Both passes run through megatron's ``get_forward_backward_func()`` schedule, so the same code drives PP = 1
(no-pipelining schedule, variable micro-batch shapes) and PP > 1 (1F1B schedule; the surrogate is the last stage's
per-micro-batch "loss", and megatron back-propagates it through the stages over p2p). The schedule divides every
micro-batch loss by the number of micro-batches; the surrogate is multiplied by it to cancel that.

Pass 2 must see pass 1's dropout masks (LoRA dropout), or the cached g would belong to a different function. Every
rank draws its masks from its own generators in micro-batch order during forwards only (backward draws nothing),
and both schedules run a stage's forwards in micro-batch order, so restoring the RNG state (CPU, CUDA and megatron's
tracker) before pass 2 replays the masks on every stage. The last stage checks it: it reports the largest
difference between the pass-2 and pass-1 embeddings (``replay_error``), which must be rounding-level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch import Tensor, nn


@dataclass
class TextBatch:
    """Right-padded token rows (n, L): ids, attention mask (1 = token) and pooling mask (1 = averaged)."""

    input_ids: Tensor
    attention_mask: Tensor
    pool_mask: Tensor

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
        length = max(int(self.attention_mask.sum(dim=1).max().item()), 1)
        return TextBatch(self.input_ids[:, :length], self.attention_mask[:, :length], self.pool_mask[:, :length])

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pool_mask.to(device))


def concat_texts(parts: Sequence[TextBatch]) -> TextBatch:
    """Stack several TextBatches (e.g. queries, positives, negatives) row-wise, padded to the longest."""
    length = max(part.length for part in parts)
    padded = [part.padded_to(length) for part in parts]
    return TextBatch(*(torch.cat(tensors) for tensors in zip(*((p.input_ids, p.attention_mask, p.pool_mask)
                                                                  for p in padded))))


class RNGSnapshot:
    """Every generator a forward pass of the tower may draw from: CPU, CUDA (all devices) and megatron's tracker."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        tracker = get_cuda_rng_tracker()
        # Tracker states are replaced (not mutated) by fork(), but clone anyway: set_states stores our dict as is.
        self.tracker = {name: state.clone() for name, state in tracker.get_states().items()}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        get_cuda_rng_tracker().set_states({name: state.clone() for name, state in self.tracker.items()})


def split_micro_batches(texts: TextBatch, micro_batch_size: int, uniform: bool) -> tuple[list[TextBatch], int]:
    """Cut ``texts`` into micro-batches of ``micro_batch_size`` rows; return them and the number of filler rows.

    ``uniform`` (PP > 1): megatron's p2p buffers have one (L, mb, hidden) shape, so every micro-batch keeps the
    full length and the last one is filled up with copies of row 0 (real tokens, so no all-masked softmax rows;
    their cached gradient is zero, so they contribute nothing). Otherwise each micro-batch is trimmed to its own
    longest row and the last may be short.
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


def _broadcast_from_last_stage(tensor: Tensor) -> Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


@torch.no_grad()
def embed_texts(tower: nn.Module, texts: TextBatch, micro_batch_size: int, broadcast: bool = True) -> Tensor | None:
    """Pooled (n, hidden) float32 embeddings of ``texts`` through the schedule, micro-batch by micro-batch.

    Every rank of the model-parallel group must call with the same ``texts``. The last pipeline stage computes them;
    with ``broadcast`` they are sent to the other stages too, else those get None. Honours the tower's mode
    (training mode draws dropout masks).
    """
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    chunks, _ = split_micro_batches(texts, micro_batch_size, uniform=pipelined)
    outputs = run_schedule(tower, chunks, None, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        embeddings = torch.cat(outputs, dim=0)[: len(texts)].float().contiguous()
    elif broadcast:
        device = texts.input_ids.device
        embeddings = torch.empty(len(texts), tower.config.hidden_size, dtype=torch.float32, device=device)
    else:
        return None
    return _broadcast_from_last_stage(embeddings) if broadcast else embeddings


@dataclass
class GradCacheResult:
    loss: float  # this rank's loss_fn value (the last stage's, broadcast over the pipeline group)
    replay_error: float  # max |pass-2 embedding - pass-1 embedding|, same on every stage; 0 up to rounding
    num_microbatches: int


def grad_cache_step(
    tower: nn.Module,
    texts: TextBatch,
    loss_fn: Callable[[Tensor], Tensor],
    micro_batch_size: int,
) -> GradCacheResult:
    """Accumulate d(loss_fn(embed(texts)))/dθ into the ``.grad`` of the tower's trainable parameters.

    ``loss_fn`` maps the (n, hidden) embeddings of all of ``texts`` to a scalar; it runs on the last pipeline stage
    only (it may be collective over that stage's data-parallel group, as SimCSE is). ``micro_batch_size`` rows
    are embedded at a time, in both passes. Every rank of the model-parallel group calls with the same ``texts``.
    Gradients are *not* reduced over data parallelism: the caller does that once for the step.
    """
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    last = parallel_state.is_pipeline_last_stage()
    chunks, fill = split_micro_batches(texts, micro_batch_size, uniform=pipelined)
    count = len(chunks)
    snapshot = RNGSnapshot()

    # Pass 1: embeddings without autograd.
    with torch.no_grad():
        outputs = run_schedule(tower, chunks, None, forward_only=True)
    loss_value = torch.zeros(1, dtype=torch.float64, device=texts.input_ids.device)
    cached: list[Tensor] = []
    grads: list[Tensor] = []
    if last:
        cached = [out.detach().float() for out in outputs]
        embeddings = torch.cat(cached)[: len(texts)].requires_grad_(True)
        loss = loss_fn(embeddings)
        loss.backward()
        loss_value[0] = loss.detach().double()
        grad = embeddings.grad
        if fill:  # filler rows of the last micro-batch get no gradient
            grad = torch.cat([grad, grad.new_zeros(fill, grad.shape[1])])
        grads = list(grad.split([len(c) for c in chunks]))

    # Pass 2: the same micro-batches with autograd and replayed dropout masks; back-propagate Σ e · g.
    snapshot.restore()

    def surrogate(index: int, output: Tensor) -> tuple[Tensor, dict]:
        # The schedule divides each micro-batch's loss by the micro-batch count (in place); multiply it back.
        value = (output.float() * grads[index]).sum() * count
        replay = (output.detach().float() - cached[index]).abs().max()
        # A fresh tensor: the schedule's in-place division must not reach the reported value (CPU_STACK.md 2(d)).
        return value, {"replay_error": replay.detach().clone()}

    reports = run_schedule(tower, chunks, surrogate, forward_only=False)
    replay = torch.zeros(1, dtype=torch.float64, device=texts.input_ids.device)
    if last:
        replay[0] = max(float(r["replay_error"]) for r in reports)
    stats = _broadcast_from_last_stage(torch.cat([loss_value, replay]))
    return GradCacheResult(loss=float(stats[0]), replay_error=float(stats[1]), num_microbatches=count)
