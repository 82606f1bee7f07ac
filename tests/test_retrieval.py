"""Retrieval recall@k on constructed features with known answers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm2clip_scale.eval.retrieval import retrieval_recall


def test_recall_counts_true_pairs_ranked_within_k() -> None:
    images = torch.eye(4)
    # Text 0 and 1 swapped: image 0's best text is text 1 (true pair ranked 2nd), likewise image 1.
    texts = images[[1, 0, 2, 3]] * 0.9 + images * 0.1
    metrics = retrieval_recall(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), ks=(1, 2))
    assert metrics["r1_i2t"] == 0.5 and metrics["r2_i2t"] == 1.0
    assert metrics["r1_t2i"] == 0.5 and metrics["r2_t2i"] == 1.0
    assert metrics["chance"] == 0.25 and metrics["num_samples"] == 4


def test_perfect_alignment_scores_one() -> None:
    features = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    metrics = retrieval_recall(features, features)
    assert metrics["r1_i2t"] == metrics["r1_t2i"] == 1.0
