"""Checking webdataset image shards and their embedding sidecars the way the loaders read them: findings by reason.

:func:`check_shard` reads one image shard as the loaders do (:func:`llm2clip_scale.data.shards.read_shard`, every
image decoded in full, sidecar vectors decoded by :class:`llm2clip_scale.data.sidecar.EmbeddingDecoder`) and counts
findings per reason, keeping a few example keys of each. It is what a pool worker runs, one whole shard per call: a
worker holds one sample and the keys of one shard at a time, never a whole shard. :func:`find_global_duplicates`
then finds keys repeated across shards from the key hashes the reports carry. The command line (shard lists, the
pool, the summary, table and json) is ``data_prep/validate_shards.py``.

Reasons, in report order (:data:`REASONS` holds the same meanings as one-liners for the report):

Image shard, one count per shard

- ``read_error``: the shard cannot be opened (missing, unreadable); with an index, all its samples count as lost.
- ``truncated``: the tar is damaged (cut short, corrupt). Samples before the damage are checked; the one being read
  when it happened is lost with the rest, as in the loaders (their ``read_error``).
- ``sample_count_mismatch``: an undamaged shard holds another number of samples than the index says.
- ``size_mismatch``: the shard's size in bytes differs from the index's (local files only).

Image samples, one count per sample

- ``duplicate_key``: a key seen before in the same shard.
- ``duplicate_key_global``: (--global-keys) a key that an earlier shard holds too, compared by 8-byte hash.
- ``missing_image``: no jpg/jpeg/png/webp member (:data:`llm2clip_scale.data.shards.IMAGE_EXTENSIONS`).
- ``empty_image``: a 0-byte image member (the loaders count it as ``bad_image``).
- ``bad_image``: image bytes PIL cannot decode in full.
- ``bad_json``: a json member that is not a json object.
- ``missing_caption``: no json member, or (without --fields) no non-blank string in it.
- ``missing_caption:<field>``: (one reason per --fields entry, after ``missing_caption``) no non-blank ``<field>``
  caption.

Sidecar, one count per sidecar shard

- ``sidecar_read_error``: the sidecar cannot be opened or read to its end; records before the damage are checked,
  samples whose records were lost count ``missing_embedding``.
- ``bad_sidecar_header``: no readable ``__sidecar__`` header of a known format.
- ``sidecar_mismatch``: the header names another image shard.
- ``sidecar_dim_mismatch``: the header's embedding_dim differs from --embedding-dim.

Sidecar records and the samples they belong to, one count per record (per sample for ``missing_embedding``)

- ``missing_embedding``: an image sample (with a usable json) without a record, or without a vector for a caption
  field its json holds (the fields: --fields, else the header's, else any the records hold).
- ``orphan_embedding``: a sidecar record for a key the image shard lacks (unchecked when the image shard is damaged).
- ``sidecar_order``: records out of the image shard's order, counted as the fewest that must move to restore it.
- ``duplicate_embedding``: a second record for the same key.
- ``wrong_embedding_dim``: a record with a vector of another width than --embedding-dim or the header's.
- ``bad_embedding``: a record with a vector that does not decode or is not finite.

The validator itself

- ``check_error``: the check of a shard failed unexpectedly; the message is in the json report.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from llm2clip_scale.data.shards import IMAGE_EXTENSIONS, SkipCounter, caption_of, parse_meta, read_shard
from llm2clip_scale.data.sidecar import (
    EMBEDDINGS_KEY,
    SIDECAR_FORMAT,
    SIDECAR_URL_KEY,
    EmbeddingDecoder,
    read_header,
)

# The docstring's reasons as one-liners, in report order, for --help, the table and the json report.
REASONS: dict[str, str] = {
    "read_error": "the shard cannot be opened (missing, unreadable)",
    "truncated": "the tar is damaged (cut short, corrupt); samples before the damage are checked",
    "sample_count_mismatch": "an undamaged shard holds another number of samples than the index says",
    "size_mismatch": "the shard's size in bytes differs from the index's",
    "duplicate_key": "a key seen before in the same shard",
    "duplicate_key_global": "(--global-keys) a key that an earlier shard holds too",
    "missing_image": "no jpg/jpeg/png/webp member",
    "empty_image": "a 0-byte image member",
    "bad_image": "image bytes PIL cannot decode in full",
    "bad_json": "a json member that is not a json object",
    "missing_caption": "no json member, or (without --fields) no non-blank string in it",
    "sidecar_read_error": "the sidecar cannot be opened or read to its end",
    "bad_sidecar_header": "no readable __sidecar__ header of a known format",
    "sidecar_mismatch": "the header names another image shard",
    "sidecar_dim_mismatch": "the header's embedding_dim differs from --embedding-dim",
    "missing_embedding": "an image sample without a record, or without a vector for a caption field its json holds",
    "orphan_embedding": "a sidecar record for a key the image shard lacks",
    "sidecar_order": "records out of the image shard's order (the fewest that must move to restore it)",
    "duplicate_embedding": "a second record for the same key",
    "wrong_embedding_dim": "a record with a vector of another width than --embedding-dim or the header's",
    "bad_embedding": "a record with a vector that does not decode or is not finite",
    "check_error": "the check of this shard failed unexpectedly (the message is in the json report)",
}
EXAMPLES_PER_REASON = 3  # keys (or messages) kept per shard and reason for the json report


# ----------------------------------------------------------------------------------------------------- one shard


@dataclass(frozen=True)
class ShardTask:
    """One image shard (and its sidecar) with the options that apply: what a pool worker is sent."""

    index: int
    url: str
    sidecar: str | None
    expected_samples: int | None  # from the index
    expected_bytes: int | None
    fields: tuple[str, ...] | None  # --fields: each must be present
    embedding_dim: int | None  # --embedding-dim
    global_keys: bool


class _Recorder(SkipCounter):
    """A SkipCounter that keeps every event instead of logging: the readers and the decoder report through it."""

    def __init__(self) -> None:
        super().__init__("validate_shards")
        self.events: list[tuple[str, str, object]] = []

    def add(self, reason: str, where: str, error: object = None) -> None:
        self.events.append((reason, where, error))


class _Findings:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(example)


def is_local(url: str) -> bool:
    """A file path here, not a url or ``pipe:`` command: only those can be opened and sized up front."""
    return "://" not in url and not url.startswith("pipe:")


def _open_error(url: str) -> str | None:
    """Why a local file cannot be opened, or None (remote urls are left to the reader)."""
    if not is_local(url):
        return None
    try:
        with open(url, "rb"):
            return None
    except OSError as err:
        return str(err)


def _image_problem(sample: dict) -> str | None:
    """The loader's image check (samples._decode_image), plus ``empty_image``; None when the image decodes."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return "missing_image"
    if len(sample[ext]) == 0:
        return "empty_image"
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.convert("RGB")  # as the loader does: decodes every pixel
    except Exception:  # noqa: BLE001 - PIL's decoders raise many types on corrupt bytes
        return "bad_image"
    return None


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _out_of_order(positions: Sequence[int]) -> tuple[int, int]:
    """(records that must move to restore increasing order = len - longest increasing run, largest displacement)."""
    tails: list[int] = []
    for p in positions:
        i = bisect.bisect_left(tails, p)
        if i == len(tails):
            tails.append(p)
        else:
            tails[i] = p
    rank = {p: r for r, p in enumerate(sorted(positions))}
    displacement = max((abs(rank[p] - i) for i, p in enumerate(positions)), default=0)
    return len(positions) - len(tails), displacement


@contextlib.contextmanager
def _quiet_data_logger() -> Iterator[None]:
    """EmbeddingDecoder logs its first wrong width as a skipped sample; here it is a finding, counted instead."""
    data_logger = logging.getLogger("llm2clip_scale.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_logger.setLevel(level)


class _Sidecar:
    """What one sidecar holds: its records' keys in order, the fields each has, its problems (vectors decoded)."""

    def __init__(self, task: ShardTask, findings: _Findings, details: dict) -> None:
        url = task.sidecar
        assert url is not None
        self.fields: dict[str, frozenset[str]] = {}  # key -> fields with a vector, in sidecar order
        self.header_fields: list[str] | None = None
        error = _open_error(url)
        if error is not None:
            findings.add("sidecar_read_error", error)
            return
        header = read_header(url)
        dim = task.embedding_dim
        if not isinstance(header, dict) or header.get("format") != SIDECAR_FORMAT:
            findings.add("bad_sidecar_header", url)
        else:
            named = header.get("image_shard")
            if named != PurePosixPath(task.url).name:
                findings.add("sidecar_mismatch", f"header names {named!r}, not {PurePosixPath(task.url).name!r}")
            fields = header.get("fields")
            self.header_fields = [str(f) for f in fields] if isinstance(fields, list) else None
            header_dim = header.get("embedding_dim")
            if isinstance(header_dim, int) and not isinstance(header_dim, bool):
                if dim is not None and header_dim != dim:
                    findings.add("sidecar_dim_mismatch", f"header embedding_dim {header_dim} != {dim}")
                if dim is None:
                    dim = header_dim
        details["sidecar_embedding_dim"] = dim
        decoder = EmbeddingDecoder(dim, f"validate {url}")
        recorder = _Recorder()
        for record in read_shard(url, recorder, error_reason="sidecar_read_error", lowercase_ext=False):
            key = record["__key__"]
            if key in self.fields:
                findings.add("duplicate_embedding", key)
                continue
            vectors = {ext[: -len(".npy")]: payload for ext, payload in record.items() if ext.endswith(".npy")}
            before = len(recorder.events)
            for name, payload in vectors.items():
                decoder({"__key__": key, EMBEDDINGS_KEY: {name: payload}, SIDECAR_URL_KEY: url}, name, recorder)
            for reason in dict.fromkeys(reason for reason, _, _ in recorder.events[before:]):  # once per record
                findings.add(reason, key)
            del recorder.events[before:]
            self.fields[key] = frozenset(vectors)
        for reason, _, error in recorder.events:  # only the read error is left
            findings.add(reason, str(error))
            details["sidecar_records_read"] = len(self.fields)

    def wanted_fields(self, task: ShardTask) -> list[str] | None:
        """Caption fields that need a vector: --fields, else the header's, else every field the records hold; None
        (nothing to go by: no header, no records) means a sample with a json needs a record of any kind."""
        if task.fields:
            return list(task.fields)
        if self.header_fields is not None:
            return self.header_fields
        return sorted(set().union(*self.fields.values())) if self.fields else None


def check_shard(task: ShardTask) -> dict:
    """The report of one image shard (and its sidecar): samples read, findings by reason, details, examples."""
    findings = _Findings()
    details: dict = {}
    hashes: list[int] = []
    samples = 0
    try:
        with _quiet_data_logger():
            samples = _check(task, findings, details, hashes)
    except Exception as err:  # noqa: BLE001 - one odd shard must not end a check of 100k
        findings.add("check_error", f"{type(err).__name__}: {err}")
    report = {"shard": task.url, "sidecar": task.sidecar, "samples": samples, "expected": task.expected_samples,
              "findings": findings.counts, "details": details, "examples": findings.examples}
    if task.global_keys:
        report["key_hashes"] = np.unique(np.fromiter(hashes, dtype=np.uint64, count=len(hashes)))
    return report


def indexed_check(task: ShardTask) -> tuple[int, dict]:
    """The pool's task: (shard index, report), as unordered results must say which shard they belong to."""
    return task.index, check_shard(task)


def _check(task: ShardTask, findings: _Findings, details: dict, hashes: list[int]) -> int:
    error = _open_error(task.url)
    if error is not None:
        findings.add("read_error", error)
        details["read"], details["lost"] = 0, task.expected_samples  # None: unknown without an index
        return 0
    if task.expected_bytes and is_local(task.url):
        size = os.path.getsize(task.url)
        if size != task.expected_bytes:
            findings.add("size_mismatch", f"{size} bytes, index says {task.expected_bytes}")
    sidecar = _Sidecar(task, findings, details) if task.sidecar is not None else None
    wanted = sidecar.wanted_fields(task) if sidecar is not None else None
    positions: dict[str, int] = {}  # key -> position of its first sample
    recorder = _Recorder()
    samples = 0
    for sample in read_shard(task.url, recorder):
        key = sample["__key__"]
        if key in positions:
            findings.add("duplicate_key", key)
        else:
            positions[key] = samples
            if task.global_keys:
                hashes.append(_key_hash(key))
        samples += 1
        meta, reason, _ = parse_meta(sample)
        if meta is None:
            findings.add(reason, key)
        elif task.fields:
            for name in task.fields:
                if caption_of(meta, name) is None:
                    findings.add(f"missing_caption:{name}", key)
        elif not any(isinstance(value, str) and value.strip() for value in meta.values()):
            findings.add("missing_caption", key)
        problem = _image_problem(sample)
        if problem is not None:
            findings.add(problem, key)
        if sidecar is not None and meta is not None:
            have = sidecar.fields.get(key)
            if wanted is None:
                missing = have is None
            else:
                need = [name for name in wanted if caption_of(meta, name) is not None]
                missing = bool(need) and (have is None or not have.issuperset(need))
            if missing:
                findings.add("missing_embedding", key)
    damaged = bool(recorder.events)
    if damaged:
        findings.add("truncated", str(recorder.events[0][2]))
        details["read"] = samples
        details["lost"] = None if task.expected_samples is None else task.expected_samples - samples
    elif task.expected_samples is not None and samples != task.expected_samples:
        findings.add("sample_count_mismatch", f"{samples} samples, index says {task.expected_samples}")
    if sidecar is not None:
        in_images = [positions[key] for key in sidecar.fields if key in positions]
        moved, displacement = _out_of_order(in_images)
        if moved:
            findings.add("sidecar_order", f"largest displacement {displacement} records", count=moved)
            details["sidecar_max_displacement"] = displacement
        if damaged:  # records of samples lost to the damage are not orphans
            details["orphans_unchecked"] = "image shard damaged"
        else:
            for key in sidecar.fields:
                if key not in positions:
                    findings.add("orphan_embedding", key)
    return samples


# ------------------------------------------------------------------------------------------------- across shards


def find_global_duplicates(reports: list[dict]) -> None:
    """Count ``duplicate_key_global`` on each shard for keys an earlier shard holds; drops the hashes.

    Keys travel as 8-byte blake2b hashes (unique per shard): the parent holds 8 bytes per sample, twice at the end.
    """
    arrays = [report.pop("key_hashes") for report in reports]
    if not arrays:
        return
    everything = np.concatenate(arrays)
    everything.sort()
    repeated = np.unique(everything[1:][everything[1:] == everything[:-1]])
    del everything
    if not repeated.size:
        return
    first_seen: set[int] = set()
    for report, hashes in zip(reports, arrays):
        later = []
        for h in hashes[np.isin(hashes, repeated)].tolist():
            if h in first_seen:
                later.append(h)
            else:
                first_seen.add(h)
        if later:
            report["findings"]["duplicate_key_global"] = len(later)
            report["examples"]["duplicate_key_global"] = [f"key hash {h:016x}" for h in later[:EXAMPLES_PER_REASON]]
