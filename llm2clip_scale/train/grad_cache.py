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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch import Tensor, nn

from llm2clip_scale.models.llm.embed import TextBatch, broadcast_from_last_stage, run_schedule, split_micro_batches


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
    stats = broadcast_from_last_stage(torch.cat([loss_value, replay]))
    return GradCacheResult(loss=float(stats[0]), replay_error=float(stats[1]), num_microbatches=count)
