"""Webdataset loaders for image–caption shards: a resampled training stream and an exact, rank-partitioned eval stream.

The loader knows nothing of models: it takes shard patterns, a tokenizer directory and sizes.

Bad data never stops a run. Samples are skipped and counted by reason:

- ``read_error``: a shard that cannot be opened or read to its end (missing, truncated, corrupt tar). Samples before
  the damage still come through; the sample being read when it happened is dropped with the shard's remainder.
- ``missing_image``: no jpg/jpeg/png/webp member.  ``bad_image``: image bytes that PIL cannot decode.
- ``bad_json``: a json member that does not parse to an object.
- ``missing_caption``: no json, or none of the wanted caption fields holds a non-empty string.

DataLoader workers are separate processes, so each worker keeps cumulative counts and stamps a snapshot on every batch
it makes; the main process keeps the latest snapshot per worker and reports the exact sum as ``batch["skipped"]``.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from webdataset.tariterators import base_plus_ext

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.config.schema import DataConfig

logger = logging.getLogger("llm2clip_scale.data")
# transformers is imported at module level on purpose: forked DataLoader workers inherit it instead of paying ~1 s.

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_PER_PROCESS_WARNINGS = 3  # per-sample warnings each process may log before it falls silent
_WORKER_KEY = "__worker__"
_SKIPPED_KEY = "__skipped__"
# An infinite resampled stream in which nothing is usable (a misspelt caption field, all shards missing) would spin
# silently forever; this many skips in a row without one good sample stops the run with a message instead.
MAX_CONSECUTIVE_SKIPS = 1000


# ----------------------------------------------------------------------------------------------------------- counting


class SkipCounter:
    """Cumulative skip counts of one process (a DataLoader worker, or the main process when num_workers=0)."""

    def __init__(self, label: str, max_consecutive: int | None = None) -> None:
        self.label = label
        self.counts: dict[str, int] = {}
        self._max_consecutive = max_consecutive
        self._streak = 0

    def good(self) -> None:
        self._streak = 0

    def add(self, reason: str, where: str, error: object = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._streak += 1
        if self._max_consecutive is not None and self._streak >= self._max_consecutive:
            raise RuntimeError(
                f"{self.label}: the last {self._streak} samples/shards were all unusable (totals {self.counts}); "
                "check data.train_shards and that data.caption_fields names fields present in the sample json"
            )
        total = sum(self.counts.values())
        if total <= _PER_PROCESS_WARNINGS:
            detail = f": {error}" if error is not None else ""
            logger.warning("%s: skipped %s (%s)%s", self.label, where, reason, detail)
            if total == _PER_PROCESS_WARNINGS:
                logger.warning("%s: further skips are reported only in aggregate", self.label)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class SkipTally:
    """Main-process totals over all workers, rebuilt from the cumulative snapshots that batches carry."""

    def __init__(self, label: str, report_growth: bool = True) -> None:
        self.label = label
        self._per_worker: dict[int, dict[str, int]] = {}
        self._report_growth = report_growth
        self._next_report = 1

    def absorb(self, batch: dict) -> dict:
        """Strip the per-worker bookkeeping from ``batch`` and set ``batch["skipped"]`` to the exact totals."""
        seen = self._per_worker.setdefault(int(batch.pop(_WORKER_KEY)), {})
        for reason, count in batch.pop(_SKIPPED_KEY).items():
            seen[reason] = max(seen.get(reason, 0), count)  # snapshots are cumulative; max is order-proof
        totals = self.totals()
        batch["skipped"] = totals
        self._maybe_report(totals)
        return batch

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counts in self._per_worker.values():
            for reason, count in counts.items():
                out[reason] = out.get(reason, 0) + count
        return out

    def _maybe_report(self, totals: dict[str, int]) -> None:
        # One line each time the total doubles: a steady trickle of bad samples costs O(log n) log lines.
        total = sum(totals.values())
        if not self._report_growth or total < self._next_report:
            return
        logger.warning("%s: %d samples skipped so far %s", self.label, total, totals)
        while self._next_report <= total:
            self._next_report *= 2


# ------------------------------------------------------------------------------------------------------ shard reading


def read_shards(sources: Iterable[dict], skips: SkipCounter) -> Iterator[dict]:
    """Pipeline stage: ``{"url": ...}`` dicts → samples ``{"__key__", "__url__", ext: bytes}``."""
    for source in sources:
        yield from _read_shard(source["url"], skips)


def _is_metadata(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.startswith("__") and base.endswith("__")


class _StrictTarInfo(tarfile.TarInfo):
    """Treat a missing end-of-archive marker as damage: tarfile ends a stream silently at a short or absent header,
    so a shard cut at (or inside) a header block would otherwise look complete."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as err:
            raise tarfile.SubsequentHeaderError(f"no end-of-archive marker ({err})") from None


def _read_shard(url: str, skips: SkipCounter) -> Iterator[dict]:
    # Our own grouping instead of wds.tarfile_to_samples: under an error handler that one passes on the half-read
    # sample of a truncated shard and misses a cut at a header, so skip counts would depend on where damage fell.
    sample: dict | None = None
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                if key is None or _is_metadata(member.name):
                    continue
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:  # stream-mode tarfile returns a short read at EOF, silently
                    raise tarfile.ReadError(f"{member.name}: truncated, {len(payload)} of {member.size} bytes")
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = payload
    except Exception as err:  # noqa: BLE001 - damaged streams raise TarError, OSError, zlib.error, even TypeError
        # Only reading can land here: consumer errors never enter a suspended generator (close() is BaseException).
        skips.add("read_error", url, err)
        return
    if sample is not None:
        yield sample


# ------------------------------------------------------------------------------------------------ sample decoding


@dataclass
class _Example:
    key: str
    image: torch.Tensor
    caption: str
    field: str
    index: int = -1  # global eval index; -1 in training


def _caption_options(sample: dict, weights: dict[str, float], skips: SkipCounter) -> list[tuple[str, str, float]]:
    """(field, caption, weight) for every wanted field present in the sample; counts the skip when there is none."""
    key = sample["__key__"]
    if "json" not in sample:
        skips.add("missing_caption", key)
        return []
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        skips.add("bad_json", key, err)
        return []
    if not isinstance(meta, dict):
        skips.add("bad_json", key, f"json is a {type(meta).__name__}, not an object")
        return []
    options = [
        (name, meta[name].strip(), weight)
        for name, weight in weights.items()
        if weight > 0 and isinstance(meta.get(name), str) and meta[name].strip()
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
) -> Iterator[_Example]:
    for sample in samples:
        # Captions first: they are cheap to check and save decoding images we would drop anyway.
        options = _caption_options(sample, weights, skips)
        if not options:
            continue
        image = _decode_image(sample, skips)
        if image is None:
            continue
        skips.good()
        name, caption = _pick_caption(options, rng)
        yield _Example(key=sample["__key__"], image=transform(image), caption=caption, field=name)


def _eval_examples(
    samples: Iterable[dict],
    field: str,
    limit: int | None,
    rank: int,
    world_size: int,
    transform: _ImageTransform,
    skips: SkipCounter,
) -> Iterator[_Example]:
    """Every rank reads and validates the same stream, so all agree on the global index of each good sample.

    Rank r keeps indices i % world_size == r, but releases its sample only once its round of world_size samples is
    complete: that drops the incomplete last round, truncating N to a multiple of world_size without knowing N first.
    """
    good = 0
    mine: tuple[int, dict, Image.Image, str] | None = None
    for sample in samples:
        if limit is not None and good >= limit:
            break
        options = _caption_options(sample, {field: 1.0}, skips)
        if not options:
            continue
        image = _decode_image(sample, skips)
        if image is None:
            continue
        index, good = good, good + 1
        if index % world_size == rank:
            mine = (index, sample, image, options[0][1])
        if good % world_size == 0 and mine is not None:
            own_index, own_sample, own_image, caption = mine
            yield _Example(own_sample["__key__"], transform(own_image), caption, field, own_index)
            mine = None


# ------------------------------------------------------------------------------------------------------- batching


class _Collator:
    """Examples → batch dict, tokenising with dynamic padding. The tokenizer loads lazily, inside the worker."""

    def __init__(self, tokenizer_path: str, max_text_len: int, worker: int, skips: SkipCounter) -> None:
        self._path = tokenizer_path
        self._max_len = max_text_len
        self._worker = worker
        self._skips = skips
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def _load(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self._path)
        # Llama-family tokenizers ship without a pad token; mean pooling reads the attention mask, so any id works.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return tokenizer

    def __call__(self, examples: list[_Example]) -> dict:
        if self._tokenizer is None:
            self._tokenizer = self._load()
        captions = [e.caption for e in examples]
        encoded = self._tokenizer(
            captions, padding="longest", truncation=True, max_length=self._max_len, return_tensors="pt"
        )
        batch = {
            "images": torch.stack([e.image for e in examples]),
            "input_ids": encoded["input_ids"].long(),
            "attention_mask": encoded["attention_mask"].long(),
            "keys": [e.key for e in examples],
            "captions": captions,
            "caption_fields": [e.field for e in examples],
            _WORKER_KEY: self._worker,
            _SKIPPED_KEY: self._skips.snapshot(),  # taken now: counts every skip before this batch left the worker
        }
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


class _TrainStream(IterableDataset):
    """One rank's infinite stream of training batches; built fresh in each worker so seeds see the worker id."""

    def __init__(
        self,
        urls: list[str],
        data_cfg: DataConfig,
        tokenizer_path: str,
        image_size: int,
        micro_batch: int,
        rank: int,
        seed: int,
        max_text_len: int,
    ) -> None:
        super().__init__()
        self.urls, self.cfg, self.tokenizer_path = urls, data_cfg, tokenizer_path
        self.image_size, self.micro_batch, self.rank, self.seed = image_size, micro_batch, rank, seed
        self.max_text_len = max_text_len
        self.pass_index = 0  # which iter() of the TrainLoader this is; part of every seed

    def __iter__(self) -> Iterator[dict]:
        worker = _worker_id()
        skips = SkipCounter(f"train data rank {self.rank} worker {worker}", MAX_CONSECUTIVE_SKIPS)
        stream = (self.seed, self.rank, worker, self.pass_index)
        shard_seed = _seeded("shards", *stream).getrandbits(62)
        cfg = self.cfg
        stages: list = [
            wds.ResampledShards(self.urls, seed=self.seed, worker_seed=lambda: shard_seed, deterministic=True),
            partial(read_shards, skips=skips),
        ]
        if cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(cfg.shuffle_buffer, rng=_seeded("shuffle", *stream)))
        rng = _seeded("augment", *stream)
        transform = _ImageTransform(self.image_size, cfg.image_mean, cfg.image_std, cfg.augment, rng)
        captions_rng = _seeded("captions", *stream)
        stages.append(
            partial(
                _train_examples, weights=dict(cfg.caption_fields), transform=transform, rng=captions_rng, skips=skips
            )
        )
        collate = _Collator(self.tokenizer_path, self.max_text_len, worker, skips)
        stages.append(partial(_batched, batch_size=self.micro_batch, collate=collate, keep_partial=False))
        return iter(wds.DataPipeline(*stages))


class _EvalStream(IterableDataset):
    """All eval shards in order, validated in full, this rank's share transformed and batched."""

    def __init__(
        self,
        urls: list[str],
        data_cfg: DataConfig,
        tokenizer_path: str,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        max_samples: int | None,
        max_text_len: int,
        field: str,
    ) -> None:
        super().__init__()
        self.urls, self.cfg, self.tokenizer_path = urls, data_cfg, tokenizer_path
        self.image_size, self.batch_size, self.rank, self.world_size = image_size, batch_size, rank, world_size
        self.max_samples, self.max_text_len, self.field = max_samples, max_text_len, field

    def __iter__(self) -> Iterator[dict]:
        skips = SkipCounter(f"eval data rank {self.rank}")
        transform = _ImageTransform(self.image_size, self.cfg.image_mean, self.cfg.image_std, "none", None)
        collate = _Collator(self.tokenizer_path, self.max_text_len, _worker_id(), skips)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            partial(read_shards, skips=skips),
            partial(
                _eval_examples,
                field=self.field,
                limit=self.max_samples,
                rank=self.rank,
                world_size=self.world_size,
                transform=transform,
                skips=skips,
            ),
            partial(_batched, batch_size=self.batch_size, collate=collate, keep_partial=True),
        )
        return iter(pipeline)


# -------------------------------------------------------------------------------------------------------- loaders


class TrainLoader:
    """Infinite iterable of training batches for one rank.

    A fresh loader with the same (seed, rank, num_workers) yields the same batches; each further ``iter()`` of one
    loader starts new workers on a new deterministic stream (seeds include the pass number), never a replay.

    Batch keys: ``images`` float32 (b,3,H,W), ``input_ids`` and ``attention_mask`` long (b,L), ``keys``,
    ``captions``, ``caption_fields`` (lists of str) and ``skipped`` (cumulative counts by reason over all workers).
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


def _rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Disjoint shard subsets per rank, so ranks never read the same samples at the same time.

    A shard in a smaller subset is drawn a little more often, by at most (k+1)/k for k shards per rank.
    """
    if len(urls) >= world_size:
        return urls[rank::world_size]
    logger.warning(
        "train data: %d shards for %d ranks; every rank resamples all shards (streams differ by seed only)",
        len(urls),
        world_size,
    )
    return urls


def build_train_loader(
    data_cfg: DataConfig,
    tokenizer_path: str,
    image_size: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    max_text_len: int,
) -> TrainLoader:
    """Infinite, resampled training batches of ``micro_batch`` samples for ``rank`` of ``world_size``.

    ``rank``/``world_size`` are the data-parallel coordinates chosen by the caller (never read from the environment).
    Shards of ``data_cfg.train_shards`` are split across ranks, then resampled with replacement per DataLoader
    worker with seeds from (seed, rank, worker); samples pass a ``shuffle_buffer``, one caption per sample is drawn
    from ``caption_fields`` weights renormalised over the fields present.
    """
    _check_common(rank, world_size, micro_batch, max_text_len, image_size)
    if not data_cfg.caption_fields or not any(w > 0 for w in data_cfg.caption_fields.values()):
        raise ValueError("data.caption_fields: give at least one field with a positive weight")
    urls = expand_shards(data_cfg.train_shards) if data_cfg.train_shards else []
    if not urls:
        raise ValueError(f"data.train_shards: {data_cfg.train_shards!r} matches no shards")
    dataset = _TrainStream(
        _rank_shards(urls, rank, world_size),
        data_cfg,
        tokenizer_path,
        image_size,
        micro_batch,
        rank,
        seed,
        max_text_len,
    )
    return TrainLoader(dataset, data_cfg.num_workers, label=f"train data rank {rank}")


def build_eval_loader(
    data_cfg: DataConfig,
    tokenizer_path: str,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None,
    max_text_len: int,
    caption_field: str,
) -> EvalLoader:
    """Deterministic eval batches: the first N = min(max_samples, good samples) of ``eval_shards`` in order, N cut
    to a multiple of world_size, rank r taking global indices i % world_size == r. Every rank yields the same number
    of batches (the last may be smaller); ``batch["index"]`` gives the global indices for all-gather and reorder.
    """
    _check_common(rank, world_size, batch_size, max_text_len, image_size)
    urls = expand_shards(data_cfg.eval_shards) if data_cfg.eval_shards else []
    if not urls:
        raise ValueError(f"data.eval_shards: {data_cfg.eval_shards!r} matches no shards")
    dataset = _EvalStream(
        urls,
        data_cfg,
        tokenizer_path,
        image_size,
        batch_size,
        rank,
        world_size,
        max_samples,
        max_text_len,
        caption_field,
    )
    return EvalLoader(dataset, data_cfg.num_workers, label=f"eval data rank {rank}")
