"""Image<->text retrieval recall@k on paired features (row i of each is one image-caption pair)."""

from __future__ import annotations

import torch

# Cosine scores within this of the true pair's count as tied with it: an fp32 matmul gives identical unit vectors
# scores that differ by ~1e-7 (blocked summation order), so exact equality would let rounding break ties.
TIE_TOLERANCE = 1e-6


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """R@k both ways for L2-normalised features; 'chance' is the R@1 of a random ranking (1/N)."""
    n = image_features.shape[0]
    similarity = image_features.float() @ text_features.float().T
    target = torch.arange(n)
    metrics: dict[str, float] = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        # Ties are broken at random, in expectation: a true pair with `higher` candidates above it and `tied` equal
        # to it (itself included) is within the top k with probability (k - higher) / tied, clipped to [0, 1]. Ties
        # counted as hits would give a collapsed tower (all features equal) R@1 = 1; this gives it chance, k/N.
        true_scores = scores[target, target].unsqueeze(1)
        higher = (scores > true_scores + TIE_TOLERANCE).sum(dim=1).double()
        tied = ((scores - true_scores).abs() <= TIE_TOLERANCE).sum(dim=1).double()
        for k in ks:
            within = ((k - higher) / tied).clamp(0.0, 1.0)
            metrics[f"r{k}_{direction}"] = round(within.mean().item(), 6)
    metrics["chance"] = 1.0 / n
    metrics["num_samples"] = n
    return metrics
