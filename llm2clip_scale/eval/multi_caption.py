"""Image-text retrieval with several captions per image, the COCO / Flickr30k protocol of the LLM2CLIP paper.

Image -> text: an image scores a hit at k when ANY of its captions is among the k best captions of the whole split.
Text -> image: a caption scores a hit at k when its own image is among the k best images. Ties follow
:mod:`llm2clip_scale.eval.ranking` (random tie-break, in expectation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm2clip_scale.eval.ranking import hit_rates


@torch.no_grad()
def multi_caption_recall(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """R@k both ways for L2-normalised ``image_features`` (N, d) and ``text_features`` (M, d); caption j belongs to
    image ``text_to_image[j]``. Returns ``r{k}_i2t``, ``r{k}_t2i``, ``num_images``, ``num_captions``. Scores are
    computed ``chunk`` queries at a time to bound memory (an (N, M) matrix of COCO 5k is 25k x 5k)."""
    n, m = image_features.shape[0], text_features.shape[0]
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"features must be (N, d) and (M, d), got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    owner = text_to_image.long().cpu()
    if owner.shape != (m,) or m == 0 or n == 0:
        raise ValueError(f"text_to_image must give one image per caption ({m}), got shape {tuple(owner.shape)}")
    if int(owner.min()) < 0 or int(owner.max()) >= n:
        raise ValueError(f"text_to_image: indices must lie in [0, {n})")
    uncaptioned = torch.bincount(owner, minlength=n) == 0
    if bool(uncaptioned.any()):
        raise ValueError(f"images without any caption: {uncaptioned.nonzero().flatten()[:10].tolist()}")
    images, texts = image_features.float().cpu(), text_features.float().cpu()
    sums = {(k, d): 0.0 for k in ks for d in ("i2t", "t2i")}
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        positives = owner.unsqueeze(0) == rows.unsqueeze(1)
        for k, rate in hit_rates(images[rows] @ texts.T, positives, ks).items():
            sums[k, "i2t"] += rate.sum().item()
    for start in range(0, m, chunk):
        rows = torch.arange(start, min(start + chunk, m))
        positives = owner[rows].unsqueeze(1) == torch.arange(n).unsqueeze(0)
        for k, rate in hit_rates(texts[rows] @ images.T, positives, ks).items():
            sums[k, "t2i"] += rate.sum().item()
    metrics = {f"r{k}_{d}": round(total / (n if d == "i2t" else m), 6) for (k, d), total in sums.items()}
    return {**metrics, "num_images": n, "num_captions": m}
