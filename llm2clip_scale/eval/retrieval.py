"""Image<->text retrieval recall@k on paired features (row i of each is one image-caption pair)."""

from __future__ import annotations

import torch


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """R@k both ways for L2-normalised features; 'chance' is the R@1 of a random ranking (1/N)."""
    n = image_features.shape[0]
    similarity = image_features.float() @ text_features.float().T
    target = torch.arange(n)
    metrics: dict[str, float] = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        # Rank of the true pair = number of candidates scored strictly higher.
        true_scores = scores[target, target].unsqueeze(1)
        rank = (scores > true_scores).sum(dim=1)
        for k in ks:
            metrics[f"r{k}_{direction}"] = round((rank < k).double().mean().item(), 6)
    metrics["chance"] = 1.0 / n
    metrics["num_samples"] = n
    return metrics
