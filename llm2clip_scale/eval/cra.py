"""Caption-retrieval accuracy (CRA), LLM2CLIP's stage-1 metric: caption 1 of each image queries all caption-2s of
the split; the share of queries whose own image's caption-2 scores highest (top-1, cosine similarity)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import Tensor

from llm2clip_scale.distributed.collectives import all_gather_rows
from llm2clip_scale.eval.retrieval import TIE_TOLERANCE
from llm2clip_scale.models.llm.embed import embed_local_batch
from llm2clip_scale.models.llm.tower import LLMTextEncoder


@torch.no_grad()
def caption_retrieval_accuracy(query_embeddings: Tensor, key_embeddings: Tensor, chunk: int = 4096) -> float:
    """Top-1 accuracy of row i of ``query_embeddings`` retrieving row i of ``key_embeddings`` among all N keys.

    Ties are split: a query whose true key ties with k-1 others earns 1/k, the expected score of a random tie-break.
    That keeps a collapsed encoder (all embeddings equal) at chance 1/N instead of 100%, and duplicate captions of
    different images at their honest value. Queries are scored ``chunk`` rows at a time to bound memory.
    """
    if query_embeddings.shape != key_embeddings.shape or query_embeddings.dim() != 2:
        raise ValueError(f"CRA needs two (N, d) tensors of one shape, got {tuple(query_embeddings.shape)} and "
                         f"{tuple(key_embeddings.shape)}")
    n = query_embeddings.shape[0]
    if n == 0:
        raise ValueError("CRA over an empty split")
    queries = F.normalize(query_embeddings.float(), dim=-1)
    keys = F.normalize(key_embeddings.float(), dim=-1)
    credit = 0.0
    for start in range(0, n, chunk):
        scores = queries[start : start + chunk] @ keys.T
        rows = torch.arange(scores.shape[0], device=scores.device)
        true = scores[rows, rows + start].unsqueeze(1)
        higher = (scores > true + TIE_TOLERANCE).sum(dim=1)
        tied = ((scores - true).abs() <= TIE_TOLERANCE).sum(dim=1)  # includes the true key itself
        credit += torch.where(higher == 0, 1.0 / tied.double(), torch.zeros_like(tied, dtype=torch.double)).sum().item()
    return credit / n


def _empty_side(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    empty = torch.zeros(0, 1, dtype=torch.long, device=device)
    return empty, empty, empty


@torch.no_grad()
def evaluate_cra(
    tower: LLMTextEncoder,
    batches: Iterable[dict],
    tp_group: dist.ProcessGroup | None = None,
    gather_group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Run ``tower`` over this rank's pair batches (``query_*`` / ``positive_*`` keys of :class:`PairCollator`;
    query = caption 1 with its instruction, positive = caption 2) and return ``{"cra", "num_pairs"}`` over the pairs
    of all ranks of ``gather_group`` (None: the world). Collective; every rank gets the same result.

    ``tp_group``: the TP group when its ranks hold different pairs (colocated layout: pairs split over the world);
    None when TP ranks hold the same pairs (megatron layout: pairs split over LLM-DP, ``gather_group`` = the DP
    group). Members of a TP group may hold different numbers of batches. With PP > 1 the whole model-parallel group
    pools its pairs (see ``embed_local_batch``). The tower runs in eval mode (no LoRA dropout) and its mode is
    restored afterwards.
    """
    was_training = tower.training
    tower.eval()
    device = torch.device(device)
    # Under PP every stage of the model-parallel group must run the same micro-batches, whatever tp_group says.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        tp_group = parallel_state.get_model_parallel_group()
    grouped = tp_group is not None and dist.get_world_size(tp_group) > 1
    queries: list[Tensor] = []
    keys: list[Tensor] = []
    iterator = iter(batches)
    try:
        while True:
            batch = next(iterator, None)
            if grouped:
                # Keep every TP member in the collective until the member with the most batches is done.
                more = torch.tensor([0 if batch is None else 1], dtype=torch.long, device=device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX, group=tp_group)
                if int(more.item()) == 0:
                    break
            elif batch is None:
                break
            for side, out in (("query", queries), ("positive", keys)):
                if batch is None:
                    ids, mask, pool = _empty_side(device)
                else:
                    ids, mask = batch[f"{side}_input_ids"].to(device), batch[f"{side}_attention_mask"].to(device)
                    pool = batch.get(f"{side}_pool_mask")
                    pool = pool.to(device) if pool is not None else mask
                out.append(embed_local_batch(tower, ids, mask, tp_group if grouped else None, pool_mask=pool))
    finally:
        tower.train(was_training)
    hidden = tower.config.hidden_size
    local_q = torch.cat(queries) if queries else torch.empty(0, hidden, device=device)
    local_k = torch.cat(keys) if keys else torch.empty(0, hidden, device=device)
    # One gather for both sides keeps query i and key i of every rank paired.
    both, _ = all_gather_rows(torch.stack([local_q, local_k], dim=1), group=gather_group)
    return {"cra": caption_retrieval_accuracy(both[:, 0], both[:, 1]), "num_pairs": float(both.shape[0])}
