"""Supervised SimCSE (LLM2Vec / LLM2CLIP stage 1) over a data-parallel group, in local-loss form.

Each query is scored by cosine similarity against every positive of the group's global batch (its own positive and
in-batch negatives) plus every hard negative of the global batch, at temperature 0.02. Rank r scores only its own b
queries against the gathered B positives and B_neg negatives; gradients flow back through the gather to the rank
that produced each candidate. Averaged over ranks (data-parallel gradient averaging) this equals the loss over the
concatenated global batch when ranks hold equal b; tests/test_stage1_parts.py checks that against one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm2clip_scale.distributed.collectives import all_gather_rows

SIMCSE_TEMPERATURE = 0.02  # LLM2Vec's scale of 50


def simcse_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = SIMCSE_TEMPERATURE,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """InfoNCE of (b, d) ``queries`` against group-gathered ``positives`` (row i pairs with query i) and optional
    hard ``negatives`` (one per query, also gathered; a negative is a candidate for every query). Embeddings need not
    be normalised: scores are cosine similarities. ``group`` is the LLM data-parallel group (None: the world).
    Returns this rank's mean loss over its b queries.
    """
    if positives.shape != queries.shape or (negatives is not None and negatives.shape != queries.shape):
        raise ValueError(
            f"simcse_loss: queries {tuple(queries.shape)}, positives {tuple(positives.shape)} and negatives "
            f"{None if negatives is None else tuple(negatives.shape)} must share one (b, d) shape"
        )
    # At scale 50 half-precision logits would be off by whole units; fp32 at least, fp64 kept (exact tests).
    dtype = torch.promote_types(queries.dtype, torch.float32)
    queries = F.normalize(queries.to(dtype), dim=-1)
    all_positives, offset = all_gather_rows(F.normalize(positives.to(dtype), dim=-1), group, differentiable=True)
    candidates = all_positives
    if negatives is not None:
        all_negatives, _ = all_gather_rows(F.normalize(negatives.to(dtype), dim=-1), group, differentiable=True)
        # Positives first, so a query's label is its global row among the positives.
        candidates = torch.cat([all_positives, all_negatives], dim=0)
    logits = queries @ candidates.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels)
