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


def test_ties_count_against_the_true_pair() -> None:
    n = 10
    images = F.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    collapsed = F.normalize(torch.ones(n, 4), dim=-1)  # a text tower whose features all coincide
    metrics = retrieval_recall(images, collapsed, ks=(1, 5))
    # Every caption ties with all others for each image: a random tie-break's expected recall, k / N.
    assert metrics["r1_i2t"] == 0.1 and metrics["r5_i2t"] == 0.5
    # Caption 1 replaced by caption 0 (orthogonal features otherwise): image 0 ties its caption with caption 1 (credit
    # 1/2); image 1 scores 0 against every caption, an N-way tie (credit 1/N); the others are exact.
    images = torch.eye(n)
    texts = images.clone()
    texts[1] = texts[0]
    tied = retrieval_recall(images, texts, ks=(1, 2))
    assert tied["r1_i2t"] == round((n - 2 + 1 / 2 + 1 / n) / n, 6)
    assert tied["r1_t2i"] == (n - 1) / n  # caption 1 (= caption 0) is closest to image 0, not its own image 1
