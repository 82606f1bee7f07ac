"""Held-out sets of the paper-protocol eval tasks (docs/EVAL.md): images with their json metadata, read in full.

A source is a webdataset shard pattern (sample = image + json, as the training shards) or a ``.jsonl`` / ``.csv``
file whose image paths are relative to the file's folder:

- ``.jsonl``: one object per image, ``{"image": "imgs/0001.jpg", "captions": ["...", ...], "label": 3, ...}``; every
  key other than ``image`` is the sample's metadata.
- ``.csv``: a header with ``image`` and ``caption`` columns (optional ``label``), one row per (image, caption); rows
  of one image are grouped, in order of first appearance, into ``{"captions": [...], "label": ...}``.

Every rank reads every record's metadata (cheap), so all agree on which records a task accepts and on their global
indices; image bytes are kept only for this rank's records (index % world_size == rank), which it encodes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llm2clip_scale.data.shards import IMAGE_EXTENSIONS, SkipCounter, parse_meta, read_shards, shard_list


@dataclass
class EvalSet:
    metas: list[dict]  # every accepted record's metadata, in source order (the same on every rank)
    keys: list[str]
    images: dict[int, bytes]  # image bytes of this rank's records, by global index
    rejected: int = 0  # records the task could not use (no image, or metadata it does not accept)
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable samples of shard sources, by reason

    def __len__(self) -> int:
        return len(self.metas)


def _shard_records(pattern: str, what: str, skips: SkipCounter) -> Iterator[tuple[str, dict, bytes | None]]:
    for sample in read_shards(({"url": url} for url in shard_list(pattern, what)), skips):
        meta, reason, detail = parse_meta(sample)
        if meta is None:
            skips.add(reason, sample["__key__"], detail)
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        yield sample["__key__"], meta, None if ext is None else sample[ext]


def _file_image(root: Path, name: object, where: str) -> bytes:
    path = root / name
    if not path.is_file():
        raise ValueError(f"{where}: image {path} not found")
    return path.read_bytes()


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict, str]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not json ({err})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{path}:{number}: each line must be a json object")
            image = meta.pop("image", None)
            if not isinstance(image, str) or not image:
                raise ValueError(f"{path}:{number}: needs an 'image' path")
            yield f"{path.name}:{number}", meta, image


def _csv_records(path: Path) -> Iterator[tuple[str, dict, str]]:
    grouped: dict[str, dict] = {}
    with path.open(encoding="utf-8", newline="") as rows:
        reader = csv.DictReader(rows)
        if not reader.fieldnames or "image" not in reader.fieldnames or "caption" not in reader.fieldnames:
            raise ValueError(f"{path}: the header must name 'image' and 'caption' columns, got {reader.fieldnames}")
        for number, row in enumerate(reader, 2):
            if not row.get("image"):
                raise ValueError(f"{path}:{number}: needs an 'image' path")
            meta = grouped.setdefault(row["image"], {"captions": []})
            meta["captions"].append(row["caption"])
            if row.get("label") not in (None, ""):
                try:
                    meta["label"] = int(row["label"])
                except ValueError:
                    raise ValueError(f"{path}:{number}: label {row['label']!r} is not an integer") from None
    for image, meta in grouped.items():
        yield image, meta, image


def read_eval_set(source: str, accept: Callable[[dict], bool], rank: int, world_size: int,
                  max_samples: int | None = None, what: str = "eval data", images: bool = True) -> EvalSet:
    """The first ``max_samples`` records of ``source`` whose metadata ``accept`` takes; this rank's image bytes
    (none with ``images=False``, for tasks that read captions only: listed image files are then not opened).

    Raises ValueError when nothing is accepted, when a shard cannot be read or (jsonl/csv) a listed image is
    missing: an eval set is expected to be whole, so damage is an error rather than a silent skip.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{what}: rank {rank} must lie in [0, world_size={world_size})")
    skips = SkipCounter(what)
    path = Path(source)
    listed = path.suffix in (".jsonl", ".csv")  # a file list: images are paths, read only for this rank's records
    if listed and not path.is_file():
        raise ValueError(f"{what}: {source} is not a file")
    if listed:
        stream = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    else:
        stream = _shard_records(source, what, skips)
    result = EvalSet(metas=[], keys=[], images={})
    for key, meta, image in stream:
        if max_samples is not None and len(result.metas) >= max_samples:
            break
        if image is None or not accept(meta):
            result.rejected += 1
            continue
        index = len(result.metas)
        result.metas.append(meta)
        result.keys.append(key)
        if not images:
            continue
        if listed and not (path.parent / image).is_file():
            # Checked for every record on every rank (only this rank's are read): a rank that raised alone would
            # leave the others waiting in the eval's collectives.
            raise ValueError(f"{what}: {key}: image {path.parent / image} not found")
        if index % world_size == rank:
            result.images[index] = _file_image(path.parent, image, f"{what}: {key}") if listed else image
    result.skipped = dict(skips.counts)
    if result.skipped.get("read_error"):
        # A missing or damaged shard would silently shrink the split and change every score: refuse it.
        raise ValueError(f"{what}: {result.skipped['read_error']} shard(s) of {source} could not be read to the end")
    if not result.metas:
        raise ValueError(f"{what}: no usable record in {source} ({result.rejected} rejected, skipped {result.skipped});"
                         " check the task's json fields (docs/EVAL.md; a synthetic set built before the eval fields "
                         "existed: rerun data_prep/make_synthetic.py)")
    return result
