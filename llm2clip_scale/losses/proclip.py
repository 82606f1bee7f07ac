"""ProCLIP's distillation losses, as pure functions of features (towers and the EMA teacher live elsewhere).

Stage 1 (representation inheritance) distils the frozen CLIP text encoder into the LLM adapter:
    L_ins    = mean_i ||norm(s_i) - norm(t_i)||^2
    L_struct = smoothL1(pdist(norm(s)), pdist(norm(t)))
Stage 2 (contrastive tuning) regularises the image tower towards its EMA copy with the same two terms:
    L = InfoNCE + lambda * [MSE(f_img, f_img^EMA) + smoothL1(pdist(f_img), pdist(f_img^EMA))]

Choices, and why:
- Features are L2-normalised inside every loss: InfoNCE only sees directions, and the ProCLIP reference trains on
  normalised embeddings (its towers are called with normalize=True), so a norm drift is neither penalised nor hidden.
- The teacher side (frozen text encoder, EMA image tower) is detached: it is a target, never trained by these losses.
- pdist is the Euclidean distance of every unordered pair i < j (torch.nn.functional.pdist): the diagonal of the full
  distance matrix is identically zero and would only dilute the mean.
- Reductions are batch means (per sample for the instance term, per pair for the structure term). The reference sums
  instead, which ties the loss scale to the batch size; a mean keeps lambda meaningful across batch sizes.
- The losses are local to the rank's batch; pairwise structure is taken within the local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of all pairs i < j, flattened (length n(n-1)/2).

    F.pdist works on differences rather than through the Gram matrix, so near-coincident rows keep their precision and
    coincident rows get a zero rather than a NaN gradient.
    """
    return F.pdist(features, p=2)


def instance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the squared distance between the normalised student and teacher features (sum over dims)."""
    diff = F.normalize(student, dim=-1) - F.normalize(teacher.detach(), dim=-1)
    return diff.pow(2).sum(dim=-1).mean()


def structure_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between the pairwise-distance structures of the normalised student and teacher batches.

    Invariant to any rotation applied to both batches: only distances within a batch are compared.
    """
    student_distances = pairwise_distances(F.normalize(student, dim=-1))
    teacher_distances = pairwise_distances(F.normalize(teacher.detach(), dim=-1))
    return F.smooth_l1_loss(student_distances, teacher_distances, beta=beta)


def self_distillation_loss(features: torch.Tensor, ema_features: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """ProCLIP stage-2 regulariser: MSE(f, f_ema) + smoothL1(pdist(f), pdist(f_ema)), to be scaled by lambda.

    Both inputs are L2-normalised first (see the module docstring), and ``ema_features`` is detached. The MSE term is
    the squared distance summed over dims and averaged over samples, i.e. instance_loss; the structure term is
    structure_loss.
    """
    return instance_loss(features, ema_features) + structure_loss(features, ema_features, beta=beta)
