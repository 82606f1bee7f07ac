"""Online stage-2 caption embedding by a tensor-parallel group of ranks that each hold different captions.

Tensor parallelism needs the same input on every rank of the TP group, but the colocated layout gives every rank
its own b samples. So the group pools its captions, runs the frozen tower once on the union, and every rank keeps
its own rows: one tower pass per TP group instead of one per rank, and each caption is embedded exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from llm2clip_scale.distributed.collectives import all_gather_rows
from llm2clip_scale.models.llm.tower import LLMTextEncoder


@torch.no_grad()
def embed_local_batch(
    tower: LLMTextEncoder, input_ids: Tensor, attention_mask: Tensor, tp_group: dist.ProcessGroup | None
) -> Tensor:
    """Embed this rank's (b, L) right-padded captions with the TP-sharded ``tower``; return (b, hidden) float32.

    Ranks of ``tp_group`` may hold different b and L. Collective over ``tp_group``: every member must call it.
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return tower(input_ids, attention_mask)
    # Pad to the group's longest caption so rows stack; extra padding is masked and so cannot change an embedding.
    length = torch.tensor([input_ids.shape[1]], dtype=torch.long, device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX, group=tp_group)
    pad = int(length.item()) - input_ids.shape[1]
    # One gather for ids and mask together: (b, 2, L_max).
    packed = torch.stack([F.pad(input_ids.long(), (0, pad)), F.pad(attention_mask.long(), (0, pad))], dim=1)
    gathered, offset = all_gather_rows(packed, group=tp_group)
    if gathered.shape[0] == 0:  # nobody in the group has captions this step
        return torch.empty(0, tower.config.hidden_size, dtype=torch.float32, device=input_ids.device)
    embeddings = tower(gathered[:, 0], gathered[:, 1])
    return embeddings[offset : offset + input_ids.shape[0]]
