"""Top-k hit rates when a query may have several correct keys, with ties broken at random in expectation.

One rule for every ranking metric here (multi-caption retrieval, zero-shot accuracy): a query's best-scoring correct
key, with ``higher`` keys scoring above it and ``tied`` keys (``tied_pos`` of them correct) within
:data:`TIE_TOLERANCE` of it, lands in the top k with the probability that a random order of the tied block puts a
correct key among its first ``m = k - higher`` places: ``1 - C(tied - tied_pos, m) / C(tied, m)``. With one correct key
this is ``m / tied``, the rule of :func:`llm2clip_scale.eval.retrieval.retrieval_recall`; a collapsed encoder (all
scores equal) scores chance instead of 100%.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm2clip_scale.eval.retrieval import TIE_TOLERANCE


def hit_rates(scores: Tensor, positives: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """Per-query probability (float64, shape (Q,)) that a correct key is within the top k, for each k of ``ks``.

    ``scores`` (Q, K) similarities; ``positives`` (Q, K) bool, at least one True per row.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)}, positives {tuple(positives.shape)}: must share a (Q, K) shape")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one correct key")
    if any(k < 1 for k in ks):
        raise ValueError(f"top-k needs k >= 1, got {ks}")
    scores = scores.double()
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values
    higher = (scores > best + TIE_TOLERANCE).sum(dim=1)
    tied_mask = (scores - best).abs() <= TIE_TOLERANCE
    tied = tied_mask.sum(dim=1)
    tied_wrong = (tied_mask & ~positives).sum(dim=1)
    rates: dict[int, Tensor] = {}
    for k in ks:
        places = (k - higher).clamp(min=0, max=None).minimum(tied)
        # P(no correct key among the first `places` of the tied block) = prod_i (tied_wrong - i) / (tied - i).
        miss = torch.ones(scores.shape[0], dtype=torch.float64, device=scores.device)
        for i in range(int(places.max().item()) if places.numel() else 0):
            factor = (tied_wrong - i).clamp(min=0).double() / (tied - i).clamp(min=1).double()
            miss = torch.where(i < places, miss * factor, miss)
        rates[k] = 1.0 - miss
    return rates
