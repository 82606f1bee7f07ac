"""Webdataset loaders for image–caption shards: a resampled training stream and an exact, rank-partitioned eval stream.

The loader knows nothing of models: it takes shard patterns, a tokenizer directory and sizes. Two text modes:

- online (default): captions are tokenised in the workers; batches carry ``input_ids``/``attention_mask``.
- offline (``data.train_embedding_shards`` / ``data.eval_embedding_shards`` set): every image shard is read with
  its sidecar shard of precomputed LLM embeddings (:mod:`llm2clip_scale.data.sidecar`), joined by key; batches
  carry ``llm_embeddings`` float32 (b, d) instead, and no tokenizer is needed. The caption field is drawn exactly as
  online (same weights, same RNG stream), so one seed picks the same fields in both modes.

Bad data never stops a run. Samples are skipped and counted by reason:

- ``read_error``: a shard that cannot be opened or read to its end (missing, truncated, corrupt tar). Samples before
  the damage still come through; the sample being read when it happened is dropped with the shard's remainder.
- ``missing_image``: no jpg/jpeg/png/webp member.  ``bad_image``: image bytes that PIL cannot decode.
- ``bad_json``: a json member that does not parse to an object.
- ``missing_caption``: no json, or none of the wanted caption fields holds a non-empty string.
- offline only: ``missing_embedding``, ``wrong_embedding_dim``, ``bad_embedding``, ``sidecar_read_error`` (see
  :mod:`llm2clip_scale.data.sidecar`).

DataLoader workers are separate processes, so each worker keeps cumulative counts and stamps a snapshot on every batch
it makes; the main process keeps the latest snapshot per worker and reports the exact sum as ``batch["skipped"]``.
Shard reading, shard lists and skip counting live in :mod:`llm2clip_scale.data.shards` and are re-exported here.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llm2clip_scale.config.schema import DataConfig
from llm2clip_scale.data.shards import (
    MAX_CONSECUTIVE_SKIPS,
    SKIPPED_KEY,
    WORKER_KEY,
    SkipCounter,
    SkipTally,
    caption_of,
    paired_shard_list,
    parse_meta,
    rank_shards,
    read_shard,
    read_shards,
)
from llm2clip_scale.data.sidecar import EmbeddingDecoder, read_paired_shards

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CONSECUTIVE_SKIPS",
    "EvalLoader",
    "SkipCounter",
    "SkipTally",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "load_tokenizer",
    "read_shard",
    "read_shards",
]

logger = logging.getLogger("llm2clip_scale.data")
# transformers is imported at module level on purpose: forked DataLoader workers inherit it instead of paying ~1 s.

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------------------------------ sample decoding


@dataclass
class _Example:
    key: str
    image: torch.Tensor
    caption: str
    field: str
    index: int = -1  # global eval index; -1 in training
    embedding: torch.Tensor | None = None  # offline mode: the sidecar vector of ``field``


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


class _ImageTransform:
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


def _train_examples(
    samples: Iterable[dict],
    weights: dict[str, float],
    transform: _ImageTransform,
    rng: random.Random,
    skips: SkipCounter,
    embeddings: EmbeddingDecoder | None = None,
) -> Iterator[_Example]:
    for sample in samples:
        # Captions first: they are cheap to check and save decoding images we would drop anyway.
        options = _caption_options(sample, weights, skips)
        if not options:
            continue
        image = _decode_image(sample, skips)
        if image is None:
            continue
        # The field is drawn before its embedding is checked, so online and offline streams draw identically.
        name, caption = _pick_caption(options, rng)
        embedding = None
        if embeddings is not None:
            embedding = embeddings(sample, name, skips)
            if embedding is None:
                continue
        skips.good()
        yield _Example(key=sample["__key__"], image=transform(image), caption=caption, field=name, embedding=embedding)


def _eval_examples(
    samples: Iterable[dict],
    field: str,
    limit: int | None,
    rank: int,
    world_size: int,
    transform: _ImageTransform,
    skips: SkipCounter,
    embeddings: EmbeddingDecoder | None = None,
) -> Iterator[_Example]:
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
            yield _Example(own_sample["__key__"], transform(own_image), caption, field, own_index, own_embedding)
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


class _Collator:
    """Examples → batch dict: tokenised with dynamic padding (online; the tokenizer loads lazily, inside the worker)
    or with the sidecar vectors stacked (offline, ``tokenizer_path=None``)."""

    def __init__(self, tokenizer_path: str | None, max_text_len: int, worker: int, skips: SkipCounter) -> None:
        self._path = tokenizer_path
        self._max_len = max_text_len
        self._worker = worker
        self._skips = skips
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def __call__(self, examples: list[_Example]) -> dict:
        captions = [e.caption for e in examples]
        batch = {
            "images": torch.stack([e.image for e in examples]),
            "keys": [e.key for e in examples],
            "captions": captions,
            "caption_fields": [e.field for e in examples],
            WORKER_KEY: self._worker,
            SKIPPED_KEY: self._skips.snapshot(),  # taken now: counts every skip before this batch left the worker
        }
        if self._path is None:
            batch["llm_embeddings"] = torch.stack([e.embedding for e in examples])
        else:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self._path)
            encoded = self._tokenizer(
                captions, padding="longest", truncation=True, max_length=self._max_len, return_tensors="pt"
            )
            batch["input_ids"] = encoded["input_ids"].long()
            batch["attention_mask"] = encoded["attention_mask"].long()
        if examples[0].index >= 0:
            batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        return batch


def _batched(
    examples: Iterable[_Example], batch_size: int, collate: Callable[[list[_Example]], dict], keep_partial: bool
) -> Iterator[dict]:
    # A full batch is held until the next example arrives (or the stream ends), so the skip snapshot of the last
    # batch of a finite stream also covers skips that happened after its last sample.
    pending: list[_Example] | None = None
    current: list[_Example] = []
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


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _seeded(*parts: object) -> random.Random:
    # String seeds hash with SHA-512 inside random.Random: stable across processes and PYTHONHASHSEED.
    return random.Random("/".join(str(p) for p in parts))


# ------------------------------------------------------------------------------------------------------- datasets


def _with_sidecars(sources: Iterable[dict], sidecars: dict[str, str]) -> Iterator[dict]:
    """Pipeline stage: attach sidecar i to image shard i (ResampledShards and SimpleShardList yield urls only)."""
    for source in sources:
        yield {**source, "sidecar": sidecars[source["url"]]}


def _source_stages(shards: list[tuple[str, str | None]], skips: SkipCounter) -> list:
    """Reader stages after the shard-list stage: plain shards, or image + sidecar shards joined by key."""
    if shards[0][1] is None:
        return [partial(read_shards, skips=skips)]
    sidecars = {image: sidecar for image, sidecar in shards}
    return [partial(_with_sidecars, sidecars=sidecars), partial(read_paired_shards, skips=skips)]


class _TrainStream(IterableDataset):
    """One rank's infinite stream of training batches; built fresh in each worker so seeds see the worker id."""

    def __init__(
        self,
        shards: list[tuple[str, str | None]],
        data_cfg: DataConfig,
        tokenizer_path: str | None,
        image_size: int,
        micro_batch: int,
        rank: int,
        seed: int,
        max_text_len: int,
        embedding_dim: int | None,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.tokenizer_path = shards, data_cfg, tokenizer_path
        self.image_size, self.micro_batch, self.rank, self.seed = image_size, micro_batch, rank, seed
        self.max_text_len, self.embedding_dim = max_text_len, embedding_dim
        self.offline = shards[0][1] is not None
        self.pass_index = 0  # which iter() of the TrainLoader this is; part of every seed

    def __iter__(self) -> Iterator[dict]:
        worker = _worker_id()
        label = f"train data rank {self.rank} worker {worker}"
        skips = SkipCounter(label, MAX_CONSECUTIVE_SKIPS)
        stream = (self.seed, self.rank, worker, self.pass_index)
        shard_seed = _seeded("shards", *stream).getrandbits(62)
        cfg = self.cfg
        urls = [image for image, _ in self.shards]
        stages: list = [
            wds.ResampledShards(urls, seed=self.seed, worker_seed=lambda: shard_seed, deterministic=True),
            *_source_stages(self.shards, skips),
        ]
        if cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(cfg.shuffle_buffer, rng=_seeded("shuffle", *stream)))
        rng = _seeded("augment", *stream)
        transform = _ImageTransform(self.image_size, cfg.image_mean, cfg.image_std, cfg.augment, rng)
        captions_rng = _seeded("captions", *stream)
        embeddings = EmbeddingDecoder(self.embedding_dim, label) if self.offline else None
        stages.append(
            partial(
                _train_examples,
                weights=dict(cfg.caption_fields),
                transform=transform,
                rng=captions_rng,
                skips=skips,
                embeddings=embeddings,
            )
        )
        collate = _Collator(None if self.offline else self.tokenizer_path, self.max_text_len, worker, skips)
        stages.append(partial(_batched, batch_size=self.micro_batch, collate=collate, keep_partial=False))
        return iter(wds.DataPipeline(*stages))


class _EvalStream(IterableDataset):
    """All eval shards in order, validated in full, this rank's share transformed and batched."""

    def __init__(
        self,
        shards: list[tuple[str, str | None]],
        data_cfg: DataConfig,
        tokenizer_path: str | None,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        max_samples: int | None,
        max_text_len: int,
        field: str,
        embedding_dim: int | None,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.tokenizer_path = shards, data_cfg, tokenizer_path
        self.image_size, self.batch_size, self.rank, self.world_size = image_size, batch_size, rank, world_size
        self.max_samples, self.max_text_len, self.field = max_samples, max_text_len, field
        self.embedding_dim = embedding_dim
        self.offline = shards[0][1] is not None

    def __iter__(self) -> Iterator[dict]:
        label = f"eval data rank {self.rank}"
        skips = SkipCounter(label)
        transform = _ImageTransform(self.image_size, self.cfg.image_mean, self.cfg.image_std, "none", None)
        collate = _Collator(None if self.offline else self.tokenizer_path, self.max_text_len, _worker_id(), skips)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([image for image, _ in self.shards]),
            *_source_stages(self.shards, skips),
            partial(
                _eval_examples,
                field=self.field,
                limit=self.max_samples,
                rank=self.rank,
                world_size=self.world_size,
                transform=transform,
                skips=skips,
                embeddings=EmbeddingDecoder(self.embedding_dim, label) if self.offline else None,
            ),
            partial(_batched, batch_size=self.batch_size, collate=collate, keep_partial=True),
        )
        return iter(pipeline)


# -------------------------------------------------------------------------------------------------------- loaders


class TrainLoader:
    """Infinite iterable of training batches for one rank.

    A fresh loader with the same (seed, rank, num_workers) yields the same batches; each further ``iter()`` of one
    loader starts new workers on a new deterministic stream (seeds include the pass number), never a replay.

    Batch keys: ``images`` float32 (b,3,H,W), ``input_ids`` and ``attention_mask`` long (b,L) (online) or
    ``llm_embeddings`` float32 (b,d) (offline), ``keys``, ``captions``, ``caption_fields`` (lists of str) and
    ``skipped`` (cumulative counts by reason over all workers).
    """

    def __init__(self, dataset: _TrainStream, num_workers: int, label: str) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.label = label
        self._passes = 0

    def __iter__(self) -> Iterator[dict]:
        tally = SkipTally(self.label)
        # A second iter() continues with fresh seeds rather than replaying the first pass (set before workers fork).
        self.dataset.pass_index = self._passes
        self._passes += 1
        seed = _seeded("dataloader", self.dataset.seed, self.dataset.rank, self.dataset.pass_index).getrandbits(63)
        for batch in _data_loader(self.dataset, self.num_workers, seed):
            yield tally.absorb(batch)


class EvalLoader:
    """Finite, deterministic iterable of eval batches for one rank; ``last_skipped`` holds the final counts.

    Batch keys: those of :class:`TrainLoader` plus ``index`` (long, global sample indices) for all-gather and reorder.
    """

    def __init__(self, dataset: _EvalStream, num_workers: int, label: str) -> None:
        self.dataset = dataset
        # One worker at most: a second would interleave shards and break the global order every rank relies on.
        self.num_workers = min(num_workers, 1)
        self.label = label
        self.last_skipped: dict[str, int] = {}

    def __iter__(self) -> Iterator[dict]:
        tally = SkipTally(self.label, report_growth=False)
        for batch in _data_loader(self.dataset, self.num_workers, seed=0):
            yield tally.absorb(batch)
        self.last_skipped = tally.totals()
        if self.last_skipped:
            logger.warning("%s: skipped %d samples %s", self.label, sum(self.last_skipped.values()), self.last_skipped)


def _data_loader(dataset: IterableDataset, num_workers: int, seed: int) -> DataLoader:
    # Own generator: DataLoader draws worker base seeds from it, else from (and advancing) the global torch RNG.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=None,  # batches are made (and tokenised) inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
    )


def _check_common(rank: int, world_size: int, batch: int, max_text_len: int, image_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"data loader: rank {rank} must lie in [0, world_size={world_size})")
    if batch < 1 or max_text_len < 2 or image_size < 1:
        raise ValueError(f"data loader: batch ({batch}), max_text_len ({max_text_len}) and image_size must be >= 1/2/1")


def _shards_for(
    images: str | None, sidecars: str | None, what: str, tokenizer_path: str | None, embedding_dim: int | None
) -> list[tuple[str, str | None]]:
    """(image, sidecar) shard pairs, after the mode's own checks (a tokenizer online, a sane size offline)."""
    shards = paired_shard_list(images, sidecars, what)
    if sidecars is None and not tokenizer_path:
        raise ValueError(f"{what}: online mode tokenises captions and needs a tokenizer path (model.llm.tokenizer)")
    if sidecars is not None:
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim: {embedding_dim} must be >= 1 (the adapter's input size)")
        # The resampler draws image urls; their sidecar is looked up by url, so a repeated url needs one sidecar.
        seen: dict[str, str | None] = {}
        for image, sidecar in shards:
            if seen.setdefault(image, sidecar) != sidecar:
                raise ValueError(f"{what}: {image} is listed twice with different sidecars")
    return shards


def build_train_loader(
    data_cfg: DataConfig,
    tokenizer_path: str | None,
    image_size: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    max_text_len: int,
    embedding_dim: int | None = None,
) -> TrainLoader:
    """Infinite, resampled training batches of ``micro_batch`` samples for ``rank`` of ``world_size``.

    ``rank``/``world_size`` are the data-parallel coordinates chosen by the caller (never read from the environment).
    Shards of ``data_cfg.train_shards`` are split across ranks, then resampled with replacement per DataLoader
    worker with seeds from (seed, rank, worker); samples pass a ``shuffle_buffer``, one caption per sample is drawn
    from ``caption_fields`` weights renormalised over the fields present.

    Offline mode (``data_cfg.train_embedding_shards`` set): sidecar i travels with image shard i (through the rank
    split and resampling) and batches carry ``llm_embeddings`` float32 (b, d) of the drawn field instead of
    ``input_ids``/``attention_mask``; ``tokenizer_path`` may be None. ``embedding_dim`` (the adapter's input size)
    is checked on every vector; None trusts the first vector each worker sees.
    """
    _check_common(rank, world_size, micro_batch, max_text_len, image_size)
    if not data_cfg.caption_fields or not any(w > 0 for w in data_cfg.caption_fields.values()):
        raise ValueError("data.caption_fields: give at least one field with a positive weight")
    shards = _shards_for(
        data_cfg.train_shards, data_cfg.train_embedding_shards, "data.train_shards", tokenizer_path, embedding_dim
    )
    dataset = _TrainStream(
        rank_shards(shards, rank, world_size),
        data_cfg,
        tokenizer_path,
        image_size,
        micro_batch,
        rank,
        seed,
        max_text_len,
        embedding_dim,
    )
    return TrainLoader(dataset, data_cfg.num_workers, label=f"train data rank {rank}")


def build_eval_loader(
    data_cfg: DataConfig,
    tokenizer_path: str | None,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None,
    max_text_len: int,
    caption_field: str,
    embedding_dim: int | None = None,
) -> EvalLoader:
    """Deterministic eval batches: the first N = min(max_samples, good samples) of ``eval_shards`` in order, N cut
    to a multiple of world_size, rank r taking global indices i % world_size == r. Every rank yields the same number
    of batches (the last may be smaller); ``batch["index"]`` gives the global indices for all-gather and reorder.

    Offline mode (``data_cfg.eval_embedding_shards`` set): as for :func:`build_train_loader`, batches carry
    ``llm_embeddings`` of ``caption_field``; a sample without a usable vector is not a good sample.
    """
    _check_common(rank, world_size, batch_size, max_text_len, image_size)
    shards = _shards_for(
        data_cfg.eval_shards, data_cfg.eval_embedding_shards, "data.eval_shards", tokenizer_path, embedding_dim
    )
    dataset = _EvalStream(
        shards,
        data_cfg,
        tokenizer_path,
        image_size,
        batch_size,
        rank,
        world_size,
        max_samples,
        max_text_len,
        caption_field,
        embedding_dim,
    )
    return EvalLoader(dataset, data_cfg.num_workers, label=f"eval data rank {rank}")
