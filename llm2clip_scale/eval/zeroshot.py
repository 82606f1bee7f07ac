"""Zero-shot classification, CLIP's recipe: every class name is written into every prompt template, the prompts are
embedded by the text side (LLM + adapter here), L2-normalised, averaged over templates and normalised again; an
image's class is the one whose mean prompt is most similar. Ties follow :mod:`llm2clip_scale.eval.ranking`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2clip_scale.eval.ranking import hit_rates

CLASS_SLOT = "{}"  # where a template takes the class name: "a photo of a {}."


def class_prompts(classes: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: prompt ``c * len(templates) + t`` is template t filled with class c."""
    if not classes or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    bad = [t for t in templates if t.count(CLASS_SLOT) != 1]
    if bad:
        raise ValueError(f"zero-shot templates must hold exactly one {CLASS_SLOT!r} for the class name: {bad}")
    if len(set(classes)) != len(classes):
        raise ValueError("zero-shot class names must be distinct")
    # replace, not format: a template may hold other braces ("a {} of {kind}") that format would read as fields.
    return [template.replace(CLASS_SLOT, name) for name in classes for template in templates]


def zeroshot_classifier(prompt_features: Tensor) -> Tensor:
    """(C, T, d) text features of every class x template -> (C, d) unit class vectors (mean over T, normalised)."""
    if prompt_features.dim() != 3:
        raise ValueError(f"prompt features must be (classes, templates, d), got {tuple(prompt_features.shape)}")
    return F.normalize(F.normalize(prompt_features.float(), dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_accuracy(image_features: Tensor, classifier: Tensor, labels: Tensor,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of ``image_features`` (N, d) against ``classifier`` (C, d) with true ``labels`` (N,):
    ``top{k}`` for each k, ``num_samples``, ``num_classes`` and ``chance`` (1/C, the top-1 of a random guess)."""
    n, c = image_features.shape[0], classifier.shape[0]
    labels = labels.long().cpu()
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"zero-shot needs one label per image, got {n} images and labels {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"zero-shot labels must lie in [0, {c})")
    scores = image_features.float().cpu() @ classifier.float().cpu().T
    positives = labels.unsqueeze(1) == torch.arange(c).unsqueeze(0)
    rates = hit_rates(scores, positives, ks)
    return {**{f"top{k}": round(rate.mean().item(), 6) for k, rate in rates.items()},
            "num_samples": n, "num_classes": c, "chance": 1.0 / c}
