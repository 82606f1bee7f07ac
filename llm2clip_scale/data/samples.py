"""From a raw shard sample to a training example to a batch: caption choice, image decoding and transforms,
tokenisation and collation. Used by the stream datasets in :mod:`llm2clip_scale.data.loader`; knows no models.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision import transforms
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llm2clip_scale.data.prompts import tokenize_captions
from llm2clip_scale.data.shards import IMAGE_EXTENSIONS, SKIPPED_KEY, WORKER_KEY, SkipCounter, caption_of, parse_meta
from llm2clip_scale.data.sidecar import EmbeddingDecoder

logger = logging.getLogger("llm2clip_scale.data")
# transformers is imported at module level on purpose: forked DataLoader workers inherit it instead of paying ~1 s.

# ------------------------------------------------------------------------------------------------ sample decoding


@dataclass
class Example:
    key: str
    image: torch.Tensor | None  # None in a text-only stream (a stage that reads no pixels)
    caption: str
    field: str
    index: int = -1  # global eval index; -1 in training
    embedding: torch.Tensor | None = None  # offline mode: the sidecar vector of ``field``
    dataset: str = ""  # which dataset of a training mix it came from


def _caption_options(sample: dict, weights: dict[str, float], skips: SkipCounter) -> list[tuple[str, str, float]]:
    """(field, caption, weight) for every wanted field present in the sample; counts the skip when there is none."""
    key = sample["__key__"]
    meta, reason, detail = parse_meta(sample)
    if meta is None:
        skips.add(reason, key, detail)
        return []
    options = [
        (name, caption, weight)
        for name, weight in weights.items()
        if weight > 0 and (caption := caption_of(meta, name)) is not None
    ]
    if not options:
        skips.add("missing_caption", key)
    return options


def _pick_caption(options: list[tuple[str, str, float]], rng: random.Random) -> tuple[str, str]:
    # random.choices renormalises over the fields present; a weight of 0 was already filtered out above.
    name, caption, _ = rng.choices(options, weights=[w for _, _, w in options])[0]
    return name, caption


def _decode_image(sample: dict, skips: SkipCounter) -> Image.Image | None:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        skips.add("missing_image", sample["__key__"])
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types on corrupt bytes, not only OSError
        skips.add("bad_image", sample["__key__"], err)
        return None


class ImageTransform:
    """Resize (or random-resized-crop) to a square, to tensor, normalise.

    Random crops draw from a seed the worker's own RNG supplies, inside a forked torch RNG, so results are
    deterministic per (seed, rank, worker) and the caller's global torch RNG is left alone when num_workers=0.
    No horizontal flip: captions say "left of".
    """

    def __init__(self, image_size: int, mean: list[float], std: list[float], augment: str, rng: random.Random | None):
        bicubic = transforms.InterpolationMode.BICUBIC
        if augment == "random_resized_crop":
            # open_clip's scale range: mild crops, so objects named in the caption stay in view.
            geometry = [transforms.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
        elif augment == "none":
            geometry = [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)]
        else:
            raise ValueError(f"data.augment: {augment!r} unknown; use none or random_resized_crop")
        self._random = augment != "none"
        if self._random and rng is None:
            raise ValueError("random augmentation needs an RNG")
        self._rng = rng
        self._pipeline = transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not self._random:
            return self._pipeline(image)
        seed = self._rng.getrandbits(63)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._pipeline(image)


def train_examples(
    samples: Iterable[dict],
    weights: dict[str, float],
    transform: ImageTransform | None,
    rng: random.Random,
    skips: SkipCounter,
    embeddings: EmbeddingDecoder | None = None,
    dataset: str = "",
) -> Iterator[Example]:
    """Training examples of ``samples``; ``transform`` None makes them text-only: no image is decoded, so a sample's
    image is neither needed nor checked."""
    for sample in samples:
        # Captions first: they are cheap to check and save decoding images we would drop anyway.
        options = _caption_options(sample, weights, skips)
        if not options:
            continue
        image = _decode_image(sample, skips) if transform is not None else None
        if image is None and transform is not None:
            continue
        # The field is drawn before its embedding is checked, so online and offline streams draw identically.
        name, caption = _pick_caption(options, rng)
        embedding = None
        if embeddings is not None:
            embedding = embeddings(sample, name, skips)
            if embedding is None:
                continue
        skips.good()
        yield Example(key=sample["__key__"], image=None if transform is None else transform(image), caption=caption,
                      field=name, embedding=embedding, dataset=dataset)


def eval_examples(
    samples: Iterable[dict],
    field: str,
    limit: int | None,
    rank: int,
    world_size: int,
    transform: ImageTransform,
    skips: SkipCounter,
    embeddings: EmbeddingDecoder | None = None,
) -> Iterator[Example]:
    """Every rank reads and validates the same stream, so all agree on the global index of each good sample.
    In offline mode that validation includes the sidecar vector.

    Rank r keeps indices i % world_size == r, but releases its sample only once its round of world_size samples is
    complete: that drops the incomplete last round, truncating N to a multiple of world_size without knowing N first.
    """
    good = 0
    mine: tuple[int, dict, Image.Image, str, torch.Tensor | None] | None = None
    for sample in samples:
        if limit is not None and good >= limit:
            break
        options = _caption_options(sample, {field: 1.0}, skips)
        if not options:
            continue
        image = _decode_image(sample, skips)
        if image is None:
            continue
        embedding = None
        if embeddings is not None:
            embedding = embeddings(sample, field, skips)
            if embedding is None:
                continue
        index, good = good, good + 1
        if index % world_size == rank:
            mine = (index, sample, image, options[0][1], embedding)
        if good % world_size == 0 and mine is not None:
            own_index, own_sample, own_image, caption, own_embedding = mine
            yield Example(own_sample["__key__"], transform(own_image), caption, field, own_index, own_embedding)
            mine = None


# ------------------------------------------------------------------------------------------------------- batching


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The caption tokenizer as every text path uses it: right padding, a pad token even for Llama-family ones."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Llama-family tokenizers ship without a pad token; mean pooling reads the attention mask, so any id works.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class Collator:
    """Examples → batch dict: tokenised in ``caption_format`` with dynamic padding and a pooling mask (online; the
    tokenizer loads lazily, inside the worker) or with the sidecar vectors stacked (offline, no ``tokenizer_path``).
    """

    def __init__(self, tokenizer_path: str | None, max_text_len: int, worker: int, skips: SkipCounter,
                 caption_format: str = "plain") -> None:
        self._path = tokenizer_path
        self._format = caption_format
        self._max_len = max_text_len
        self._worker = worker
        self._skips = skips
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def __call__(self, examples: list[Example]) -> dict:
        captions = [e.caption for e in examples]
        batch = {
            **({"images": torch.stack([e.image for e in examples])} if examples[0].image is not None else {}),
            "keys": [e.key for e in examples],
            "captions": captions,
            "caption_fields": [e.field for e in examples],
            "datasets": [e.dataset for e in examples],
            WORKER_KEY: self._worker,
            SKIPPED_KEY: self._skips.snapshot(),  # taken now: counts every skip before this batch left the worker
        }
        if self._path is None:
            batch["llm_embeddings"] = torch.stack([e.embedding for e in examples])
        else:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self._path)
            ids, mask, pool = tokenize_captions(self._tokenizer, captions, self._format, max_len=self._max_len)
            batch["input_ids"], batch["attention_mask"], batch["pool_mask"] = ids, mask, pool
        if examples[0].index >= 0:
            batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        return batch


def batched(
    examples: Iterable[Example], batch_size: int, collate: Callable[[list[Example]], dict], keep_partial: bool
) -> Iterator[dict]:
    # A full batch is held until the next example arrives (or the stream ends), so the skip snapshot of the last
    # batch of a finite stream also covers skips that happened after its last sample.
    pending: list[Example] | None = None
    current: list[Example] = []
    for example in examples:
        if pending is not None:
            yield collate(pending)
            pending = None
        current.append(example)
        if len(current) == batch_size:
            pending, current = current, []
    if pending is not None:
        yield collate(pending)
    if current and keep_partial:
        yield collate(current)


def worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def seeded(*parts: object) -> random.Random:
    # String seeds hash with SHA-512 inside random.Random: stable across processes and PYTHONHASHSEED.
    return random.Random("/".join(str(p) for p in parts))


