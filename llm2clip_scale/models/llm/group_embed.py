"""Online stage-2 caption embedding by the model-parallel group of ranks that each hold different captions.

Tensor parallelism needs the same input on every rank of the TP group, and a pipeline needs every stage to work on
the same micro-batches, but the colocated layout gives every rank its own b samples. So the model-parallel group
(TP x PP ranks) pools its captions, runs the frozen tower once on the union, and every rank keeps its own rows: one
tower pass per model-parallel group instead of one per rank, and each caption is embedded exactly once.

With PP > 1 the pass is megatron's forward-only pipeline schedule: the pooled union is cut into micro-batches, the
last stage ends up holding the pooled embeddings, and it broadcasts them back over its pipeline group (the ranks
of the same TP rank), after which every rank of the model-parallel group holds all rows and takes its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from llm2clip_scale.distributed.collectives import all_gather_rows
from llm2clip_scale.models.llm.tower import LLMTextEncoder


def _gather_captions(
    input_ids: Tensor, attention_mask: Tensor, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor, int]:
    """The group's captions in rank order, padded to the group's longest, and this rank's row offset."""
    # Pad to the group's longest caption so rows stack; extra padding is masked and so cannot change an embedding.
    length = torch.tensor([input_ids.shape[1]], dtype=torch.long, device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX, group=group)
    pad = int(length.item()) - input_ids.shape[1]
    # One gather for ids and mask together: (b, 2, L_max).
    packed = torch.stack([F.pad(input_ids.long(), (0, pad)), F.pad(attention_mask.long(), (0, pad))], dim=1)
    gathered, offset = all_gather_rows(packed, group=group)
    return gathered[:, 0], gathered[:, 1], offset


def _pipeline_embed(tower: LLMTextEncoder, input_ids: Tensor, attention_mask: Tensor, micro_batch_size: int) -> Tensor:
    """Pooled (n, hidden) float32 embeddings of the same captions on every stage, through the pipeline schedule."""
    n, length = input_ids.shape
    num_microbatches = math.ceil(n / micro_batch_size)
    # Micro-batches must share one shape for the p2p buffers; the filler rows are all padding and are dropped.
    fill = num_microbatches * micro_batch_size - n
    ids = F.pad(input_ids, (0, 0, 0, fill))
    mask = F.pad(attention_mask, (0, 0, 0, fill))
    batches = iter(zip(ids.split(micro_batch_size), mask.split(micro_batch_size)))

    def keep_output(output: Tensor, non_loss_data: bool = True) -> Tensor:
        return output

    def forward_step(data_iterator: Iterator[tuple[Tensor, Tensor]], model: LLMTextEncoder) -> tuple[Tensor, Callable]:
        mb_ids, mb_mask = next(data_iterator)
        return model(mb_ids, mb_mask), keep_output

    # collect_non_loss_data hands the last stage's outputs back untouched (the loss path would divide them by
    # num_microbatches in place).
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[tower],
        num_microbatches=num_microbatches,
        seq_length=length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if parallel_state.is_pipeline_last_stage():
        pooled = torch.cat(outputs, dim=0)[:n].float().contiguous()
    else:
        pooled = torch.empty(n, tower.config.hidden_size, dtype=torch.float32, device=input_ids.device)
    dist.broadcast(pooled, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return pooled


@torch.no_grad()
def embed_local_batch(
    tower: LLMTextEncoder,
    input_ids: Tensor,
    attention_mask: Tensor,
    tp_group: dist.ProcessGroup | None,
    micro_batch_size: int | None = None,
) -> Tensor:
    """Embed this rank's (b, L) right-padded captions with the sharded ``tower``; return (b, hidden) float32.

    Ranks may hold different b and L. Collective: with PP = 1 over ``tp_group``; with PP > 1 over megatron's whole
    model-parallel group (TP x PP), whatever ``tp_group`` is, since every stage must run the same micro-batches.
    ``micro_batch_size`` (PP > 1 only) defaults to splitting the group's captions into PP micro-batches, the fewest
    that keep every stage busy.
    """
    initialized = parallel_state.model_parallel_is_initialized()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size() if initialized else 1
    if pp_size > 1:
        ids, mask, offset = _gather_captions(input_ids, attention_mask, parallel_state.get_model_parallel_group())
        if ids.shape[0] == 0:  # nobody in the group has captions this step
            return torch.empty(0, tower.config.hidden_size, dtype=torch.float32, device=input_ids.device)
        mbs = micro_batch_size or math.ceil(ids.shape[0] / pp_size)
        return _pipeline_embed(tower, ids, mask, mbs)[offset : offset + input_ids.shape[0]]
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return tower(input_ids, attention_mask)
    ids, mask, offset = _gather_captions(input_ids, attention_mask, tp_group)
    if ids.shape[0] == 0:
        return torch.empty(0, tower.config.hidden_size, dtype=torch.float32, device=input_ids.device)
    return tower(ids, mask)[offset : offset + input_ids.shape[0]]
