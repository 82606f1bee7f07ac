"""Shard-level plumbing shared by the loaders, the sidecar reader and the data-prep tools.

Strict tar reading (damage is detected, never mistaken for a clean end), shard lists and their per-rank split,
the sample-json caption rule, and skip counting.

Bad data never stops a run. Samples are skipped and counted by reason (the loaders and the sidecar reader add more
reasons, see :mod:`llm2clip_scale.data.loader` and :mod:`llm2clip_scale.data.sidecar`):

- ``read_error``: a shard that cannot be opened or read to its end (missing, truncated, corrupt tar). Samples before
  the damage still come through; the sample being read when it happened is dropped with the shard's remainder.

DataLoader workers are separate processes, so each worker keeps cumulative counts (:class:`SkipCounter`) and stamps
a snapshot on every batch it makes; the main process keeps the latest snapshot per worker (:class:`SkipTally`) and
reports the exact sum as ``batch["skipped"]``.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from llm2clip_scale.config.load import expand_shards

logger = logging.getLogger("llm2clip_scale.data")

_PER_PROCESS_WARNINGS = 3  # per-sample warnings each process may log before it falls silent
WORKER_KEY = "__worker__"
SKIPPED_KEY = "__skipped__"
# An infinite resampled stream in which nothing is usable (a misspelt caption field, all shards missing) would spin
# silently forever; this many skips in a row without one good sample stops the run with a message instead.
MAX_CONSECUTIVE_SKIPS = 1000
# A sample's image members, in the loaders' order of preference. Here, not in samples.py, so that the shard validator
# (shard_check.py) checks against the same tuple without importing transformers and torchvision (seconds a process).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

T = TypeVar("T")


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
                "check data.train_shards, data.train_embedding_shards and that data.caption_fields names fields "
                "present in the sample json"
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
        seen = self._per_worker.setdefault(int(batch.pop(WORKER_KEY)), {})
        for reason, count in batch.pop(SKIPPED_KEY).items():
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
        yield from read_shard(source["url"], skips)


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


def read_shard(
    url: str, skips: SkipCounter, error_reason: str = "read_error", lowercase_ext: bool = True
) -> Iterator[dict]:
    """Samples of one tar shard, grouped by key; damage counts one ``error_reason`` and ends the shard.

    ``lowercase_ext=False`` keeps member suffixes as written (sidecar members are named after caption fields,
    which are case-sensitive json keys).
    """
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
                sample[ext.lower() if lowercase_ext else ext] = payload
    except Exception as err:  # noqa: BLE001 - damaged streams raise TarError, OSError, zlib.error, even TypeError
        # Only reading can land here: consumer errors never enter a suspended generator (close() is BaseException).
        skips.add(error_reason, url, err)
        return
    if sample is not None:
        yield sample


# --------------------------------------------------------------------------------------------- shard lists and ranks


def shard_list(pattern: str | None, what: str) -> list[str]:
    """Expand a brace/glob shard pattern; ``what`` names the config field in the error when nothing matches."""
    urls = expand_shards(pattern) if pattern else []
    if not urls:
        raise ValueError(f"{what}: {pattern!r} matches no shards")
    return urls


def paired_shard_list(images: str | None, sidecars: str | None, what: str) -> list[tuple[str, str | None]]:
    """(image shard, sidecar shard or None) pairs; sidecar i belongs to image shard i, so the counts must agree.

    ``sidecars`` may be a folder: then each image shard's sidecar is the file of the same name in it.
    """
    image_urls = shard_list(images, what)
    if sidecars is None:
        return [(url, None) for url in image_urls]
    sidecar_what = what.replace("_shards", "_embedding_shards")
    if Path(sidecars).is_dir():
        # A folder of sidecars named after their image shards (embed_captions.py writes them so): no pattern to
        # keep in step with 100k image shards listed by a dataset index.
        return [(url, str(Path(sidecars) / PurePosixPath(url).name)) for url in image_urls]
    sidecar_urls = shard_list(sidecars, sidecar_what)
    if len(sidecar_urls) != len(image_urls):
        raise ValueError(
            f"{sidecar_what}: {len(sidecar_urls)} sidecar shards for {len(image_urls)} image shards in {what}; "
            "give one sidecar per image shard, in the same order"
        )
    return list(zip(image_urls, sidecar_urls))


def rank_shards(items: Sequence[T], rank: int, world_size: int, what: str = "train data") -> list[T]:
    """Disjoint shard subsets per rank, so ranks never read the same samples at the same time.

    A shard in a smaller subset is drawn a little more often, by at most (k+1)/k for k shards per rank.
    """
    if len(items) >= world_size:
        return list(items[rank::world_size])
    logger.warning(
        "%s: %d shards for %d ranks; every rank resamples all shards (streams differ by seed only)",
        what,
        len(items),
        world_size,
    )
    return list(items)


# ----------------------------------------------------------------------------------------------------- sample json


def parse_meta(sample: dict) -> tuple[dict | None, str | None, object]:
    """(json object, None, None), or (None, skip reason, detail): ``missing_caption`` without json, ``bad_json``."""
    if "json" not in sample:
        return None, "missing_caption", None
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        return None, "bad_json", err
    if not isinstance(meta, dict):
        return None, "bad_json", f"json is a {type(meta).__name__}, not an object"
    return meta, None, None


def caption_of(meta: dict, field: str) -> str | None:
    """The caption text of ``field`` as the loaders use it (stripped), or None when absent or blank.

    One rule for the loaders and the offline embedding step, so a sidecar embeds exactly the text online mode would.
    """
    value = meta.get(field)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()
