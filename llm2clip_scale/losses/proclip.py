"""ProCLIP's distillation losses, as pure functions of features (towers and the EMA teacher live elsewhere).

Stage 1 (representation inheritance) distils the frozen CLIP text encoder into the LLM adapter:
    L_ins    = R_i ||norm(s_i) - norm(t_i)||^2
    L_struct = R_{i<j} smoothL1(pdist(norm(s)), pdist(norm(t)))
Stage 2 (contrastive tuning) regularises the image tower towards its EMA copy with the same two terms:
    L = InfoNCE + lambda * [MSE(f_img, f_img^EMA) + smoothL1(pdist(f_img), pdist(f_img^EMA))]
R is the reduction: ``mean`` (default: per sample for L_ins, per pair for L_struct) or ``sum`` (the official
ProCLIP code, F.mse_loss / F.smooth_l1_loss with reduction='sum').

Choices, and why:
- Features are L2-normalised inside every loss: InfoNCE only sees directions, and the ProCLIP reference trains on
  normalised embeddings (its towers are called with normalize=True), so a norm drift is neither penalised nor hidden.
- The teacher side (frozen text encoder, EMA image tower) is detached: it is a target, never trained by these losses.
- pdist is the Euclidean distance of every unordered pair i < j (torch.nn.functional.pdist): the diagonal of the full
  distance matrix is identically zero and would only dilute the mean.
- Mean by default. With b rows, sum = b * mean for L_ins and b(b-1)/2 * mean for L_struct: summing makes the
  structure/instance ratio (b-1)/2 times larger and every weight (lambda, instance/structure weights) b times larger,
  so the official weights hold only at the official per-rank batch. A mean keeps the weights meaningful across batch
  sizes; ``sum`` is offered to reproduce the official run (docs/RECIPES.md has the mapping).
- The losses are local to the rank's batch; pairwise structure is taken within the local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"ProCLIP loss reduction: {reduction!r} unknown; use one of {REDUCTIONS}")


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of all pairs i < j, flattened (length n(n-1)/2).

    F.pdist works on differences rather than through the Gram matrix, so near-coincident rows keep their precision and
    coincident rows get a zero rather than a NaN gradient.
    """
    return F.pdist(features, p=2)


def instance_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared distance between the normalised student and teacher rows (summed over dims), reduced over rows."""
    _check_reduction(reduction)
    diff = F.normalize(student, dim=-1) - F.normalize(teacher.detach(), dim=-1)
    per_row = diff.pow(2).sum(dim=-1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


def structure_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0, reduction: str = "mean"
                   ) -> torch.Tensor:
    """Smooth-L1 between the pairwise-distance structures of the normalised student and teacher batches.

    Invariant to any rotation applied to both batches: only distances within a batch are compared.
    """
    _check_reduction(reduction)
    student_distances = pairwise_distances(F.normalize(student, dim=-1))
    teacher_distances = pairwise_distances(F.normalize(teacher.detach(), dim=-1))
    return F.smooth_l1_loss(student_distances, teacher_distances, beta=beta, reduction=reduction)


def self_distillation_loss(features: torch.Tensor, ema_features: torch.Tensor, beta: float = 1.0,
                           reduction: str = "mean") -> torch.Tensor:
    """ProCLIP stage-2 regulariser: MSE(f, f_ema) + smoothL1(pdist(f), pdist(f_ema)), to be scaled by lambda.

    Both inputs are L2-normalised first (see the module docstring), and ``ema_features`` is detached. The MSE term is
    the squared distance summed over dims and reduced over samples, i.e. instance_loss; the structure term is
    structure_loss.
    """
    return (instance_loss(features, ema_features, reduction)
            + structure_loss(features, ema_features, beta=beta, reduction=reduction))


def multi_view_losses(views: list[tuple[torch.Tensor, torch.Tensor]], structure: list[bool], reduction: str = "mean",
                      beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_ins, L_struct) of stage 1 over several caption views of one batch: (student, teacher) rows per view.

    Each view's terms are reduced over its rows (pairs) by ``reduction``, then over views the same way: the mean over
    the views that have rows (pairs: at least 2 rows), or their sum. ``structure[v]`` says whether view v adds to
    L_struct (the official recipe distils structure on its short captions only). A term no view contributes to is a
    zero that still depends on the students, so every rank runs the same backward.
    """
    _check_reduction(reduction)
    if len(structure) != len(views):
        raise ValueError(f"multi_view_losses: {len(views)} views but {len(structure)} structure flags")
    zero = sum(student.sum() for student, _ in views) * 0.0
    ins = [instance_loss(s, t, reduction) for s, t in views if s.shape[0] > 0]
    struct = [structure_loss(s, t, beta, reduction) for (s, t), on in zip(views, structure) if on and s.shape[0] > 1]

    def combine(terms: list[torch.Tensor]) -> torch.Tensor:
        if not terms:
            return zero
        total = torch.stack(terms).sum()
        return total / len(terms) if reduction == "mean" else total

    return combine(ins), combine(struct)
