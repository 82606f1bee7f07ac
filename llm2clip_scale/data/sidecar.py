"""Sidecar shards: precomputed LLM caption embeddings that travel beside the image shards (offline stage 2).

Format
------
For every image shard ``X.tar`` there is one sidecar tar, by convention ``<embeddings dir>/X.tar``:

- first member ``__sidecar__`` (no dot, so every webdataset-style reader ignores it): a json header
  ``{"format": 1, "image_shard": "X.tar", "fields": [...], "embedding_dim": d, "dtype": "float16",
  "max_text_len": L, "source": {...}}``. It lets a restarted embedding job tell a finished sidecar made with the
  same settings from one it must redo.
- then, for each sample key of ``X.tar`` in the same order, one member ``<key>.<field>.npy`` per caption field
  the sample's json holds (non-blank) among ``fields``: a 1-D numpy array of ``embedding_dim`` float16 or float32
  values (``numpy.save``, no pickle), the mean-pooled tower output for the stripped caption text
  (:func:`llm2clip_scale.data.shards.caption_of`) tokenised with right padding and ``max_text_len`` truncation.
  A sample without any such field has no members. Keys follow webdataset's rule (member name up to the first dot of
  its base name), so keys hold no dots; field names may.

Sidecars are written whole under a temporary name and renamed, so a sidecar that exists is complete.

Reading
-------
The loaders read image shard i and sidecar i together and join samples by key (:func:`read_paired_shards`), with a
bounded look-ahead so a sidecar with a missing or reordered record never shifts embeddings onto other images. What
cannot be matched is skipped and counted, never misaligned:

- ``missing_embedding``: no sidecar record for the key (key mismatch), or no member for the drawn caption field.
- ``wrong_embedding_dim``: a vector of another size than expected; the first one per process is also logged with the
  shard and both sizes.
- ``bad_embedding``: a member that is not a finite 1-D float16/float32 npy array.
- ``sidecar_read_error``: a sidecar shard that cannot be opened or read to its end (one count per shard; its image
  samples after the damage then count as ``missing_embedding``).

Writing
-------
:func:`write_sidecars` embeds the captions of whole image shards with a (tensor-parallel) text tower; the CLI is
``data_prep/embed_captions.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, read_shard

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("llm2clip_scale.data")

SIDECAR_FORMAT = 1
HEADER_MEMBER = "__sidecar__"
EMBEDDINGS_KEY = "__embeddings__"  # sample entry the paired reader adds: {field: npy bytes}
SIDECAR_URL_KEY = "__sidecar_url__"
EMBEDDING_DTYPES: tuple[str, ...] = ("float16", "float32")
# Records the paired reader may hold while looking for a key. Sidecars are written in image order, so any look-ahead
# finds every record of a well-formed pair; the bound only caps memory when a sidecar belongs to another shard.
DEFAULT_LOOKAHEAD = 256


# ------------------------------------------------------------------------------------------------------------ reading


def read_paired_shards(
    sources: Iterable[dict], skips: SkipCounter, lookahead: int = DEFAULT_LOOKAHEAD
) -> Iterator[dict]:
    """Pipeline stage: ``{"url", "sidecar"}`` dicts → image samples carrying ``EMBEDDINGS_KEY`` ({field: bytes}).

    A sample whose key the sidecar lacks gets an empty mapping; the decoding stage counts it as missing.
    """
    for source in sources:
        images = read_shard(source["url"], skips)
        sidecar_url = source.get("sidecar")
        if sidecar_url is None:
            yield from images
            continue
        yield from _join_by_key(images, sidecar_url, skips, lookahead)


def _join_by_key(images: Iterator[dict], sidecar_url: str, skips: SkipCounter, lookahead: int) -> Iterator[dict]:
    records = read_shard(sidecar_url, skips, error_reason="sidecar_read_error", lowercase_ext=False)
    pending: OrderedDict[str, dict] = OrderedDict()  # sidecar records read ahead, not yet claimed by an image
    exhausted = False
    try:
        for sample in images:
            key = sample["__key__"]
            record = pending.pop(key, None)
            budget = lookahead
            while record is None and not exhausted and budget > 0:
                nxt = next(records, None)
                if nxt is None:
                    exhausted = True
                elif nxt["__key__"] == key:
                    record = nxt
                else:
                    budget -= 1
                    pending[nxt["__key__"]] = nxt
                    if len(pending) > lookahead:  # an orphan record (no image claimed it within the window)
                        pending.popitem(last=False)
            sample[EMBEDDINGS_KEY] = _members(record) if record is not None else {}
            sample[SIDECAR_URL_KEY] = sidecar_url
            yield sample
    finally:
        records.close()  # release the sidecar file even when the image shard ends first


def _members(record: dict) -> dict[str, bytes]:
    return {ext[: -len(".npy")]: payload for ext, payload in record.items() if ext.endswith(".npy")}


class EmbeddingDecoder:
    """One process's check of sidecar vectors: npy → float32 tensor of ``expected_dim``, or a counted skip.

    With ``expected_dim=None`` the first good vector fixes the size for this process (pass the adapter's input size
    instead: workers would otherwise each trust their own first vector).
    """

    def __init__(self, expected_dim: int | None, label: str) -> None:
        self.expected_dim = expected_dim
        self.label = label
        self._warned_dim = False

    def __call__(self, sample: dict, field: str, skips: SkipCounter) -> torch.Tensor | None:
        key = sample["__key__"]
        payload = sample.get(EMBEDDINGS_KEY, {}).get(field)
        if payload is None:
            skips.add("missing_embedding", f"{key} ({field})")
            return None
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - np.load raises ValueError, OSError, EOFError on corrupt bytes
            skips.add("bad_embedding", f"{key} ({field})", err)
            return None
        if array.ndim != 1 or array.dtype.name not in EMBEDDING_DTYPES:
            skips.add("bad_embedding", f"{key} ({field})", f"{array.dtype.name} array of shape {array.shape}")
            return None
        if self.expected_dim is None:
            self.expected_dim = int(array.shape[0])
        if array.shape[0] != self.expected_dim:
            if not self._warned_dim:  # the per-sample warnings may already be spent; this mistake needs its own line
                self._warned_dim = True
                logger.warning(
                    "%s: sidecar %s holds %d-dim embeddings (key %s, field %s) but %d are expected; such samples "
                    "are skipped as wrong_embedding_dim (embedded with another model, or model.adapter.input_dim?)",
                    self.label, sample.get(SIDECAR_URL_KEY, "?"), array.shape[0], key, field, self.expected_dim,
                )
            skips.add("wrong_embedding_dim", f"{key} ({field})", f"{array.shape[0]} != {self.expected_dim}")
            return None
        vector = torch.from_numpy(array.astype(np.float32))
        if not torch.isfinite(vector).all():
            skips.add("bad_embedding", f"{key} ({field})", "non-finite values")
            return None
        return vector


# ------------------------------------------------------------------------------------------------------------ writing


def sidecar_path(image_url: str, out_dir: str | os.PathLike) -> Path:
    """Where the sidecar of ``image_url`` goes: the image shard's file name inside ``out_dir``."""
    return Path(out_dir) / PurePosixPath(image_url).name


def make_header(
    image_url: str, fields: Sequence[str], embedding_dim: int, dtype: str, max_text_len: int, source: dict | None
) -> dict:
    return {
        "format": SIDECAR_FORMAT,
        "image_shard": PurePosixPath(image_url).name,
        "fields": list(fields),
        "embedding_dim": int(embedding_dim),
        "dtype": dtype,
        "max_text_len": int(max_text_len),
        "source": dict(source or {}),
    }


def read_header(path: str | os.PathLike) -> dict | None:
    """The header of an existing sidecar, or None when there is no readable one."""
    try:
        with tarfile.open(path, mode="r|") as tar:
            member = next(iter(tar), None)
            if member is None or member.name != HEADER_MEMBER:
                return None
            return json.loads(tar.extractfile(member).read())
    except (OSError, tarfile.TarError, ValueError):
        return None


def write_sidecar(
    path: str | os.PathLike, header: dict, records: Iterable[tuple[str, dict[str, np.ndarray]]]
) -> None:
    """Write a sidecar atomically: a temporary name in the same directory, renamed once complete.

    ``records`` are (key, {field: 1-D array}) in image-shard order; arrays are stored in the dtype they come in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:  # PAX: no 100-char name limit
            _add_member(tar, HEADER_MEMBER, json.dumps(header, sort_keys=True).encode())
            for key, vectors in records:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
                for name, vector in vectors.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(vector), allow_pickle=False)
                    _add_member(tar, f"{key}.{name}.npy", buf.getvalue())
        os.replace(tmp, path)  # atomic on POSIX: readers and restarts see nothing or the whole sidecar
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # same inputs, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


@dataclass
class SidecarReport:
    """What one rank's call of :func:`write_sidecars` did; every rank of a TP group reports the same shards."""

    written: list[str] = field(default_factory=list)  # sidecar paths (re)computed by this rank's TP group
    reused: list[str] = field(default_factory=list)  # complete sidecars with matching headers left alone
    failed: list[str] = field(default_factory=list)  # image shards that could not be read at all
    samples: int = 0
    captions: int = 0
    writer: bool = False  # this rank is TP rank 0 of its group: the one that writes files


def _captions_of_shard(image_url: str, fields: Sequence[str]) -> tuple[list[tuple[str, str, str]], int, bool]:
    """(key, field, caption) of every wanted non-blank field, the sample count, and whether the shard read fully."""
    skips = SkipCounter(f"embed captions {image_url}")
    items: list[tuple[str, str, str]] = []
    samples = 0
    for sample in read_shard(image_url, skips):
        samples += 1
        meta, _, _ = parse_meta(sample)  # bad json: no record; the loader counts that sample as bad_json anyway
        if meta is None:
            continue
        for name in fields:
            caption = caption_of(meta, name)
            if caption is not None:
                items.append((sample["__key__"], name, caption))
    return items, samples, not skips.counts


def _embed_items(
    tower: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    max_text_len: int,
    batch_size: int,
    device: torch.device | str,
    caption_format: str,
) -> np.ndarray:
    """(n, hidden) float32 embeddings of ``captions`` in their order. Collective over the tower's TP group."""
    from llm2clip_scale.data.prompts import tokenize_captions
    from llm2clip_scale.models.llm.embed import TextBatch, embed_texts

    hidden = int(tower.config.hidden_size)
    out = np.zeros((len(captions), hidden), dtype=np.float32)
    if not captions:
        return out
    # Same tokenisation as the online loader; batches are formed in length order so short alt-text is not padded to
    # the longest dense caption. Padding is masked, so order and batch composition do not change an embedding.
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask, pool = tokenize_captions(tokenizer, [captions[i] for i in rows], caption_format,
                                            max_len=max_text_len)
        # Every TP rank holds the same ids (broadcast captions, deterministic tokenizer): TP's contract.
        pooled = embed_texts(tower, TextBatch(ids, mask, pool).to(device))
        out[rows] = pooled.cpu().numpy()
    return out


@torch.no_grad()
def write_sidecars(
    tower: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    image_urls: Sequence[str],
    out_dir: str | os.PathLike,
    fields: Sequence[str],
    max_text_len: int,
    *,
    llm_dp_rank: int = 0,
    llm_dp_size: int = 1,
    tp_group: dist.ProcessGroup | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
    source: dict | None = None,
    caption_format: str = "plain",
) -> SidecarReport:
    """Embed the ``fields`` captions of whole image shards with ``tower`` and write one sidecar per shard.

    Collective over ``tp_group`` (the tower's tensor-parallel group, PP = 1): shard i belongs to LLM-data-parallel
    group ``i % llm_dp_size``. TP rank 0 reads the shard and broadcasts its captions, so every rank of the group runs
    identical inputs; only TP rank 0 writes, atomically. A sidecar that already exists with the same header
    (fields, size, dtype, max_text_len, ``source``) is kept, so a restarted job redoes only unfinished shards.
    ``source`` describes the model (checkpoint, seed, LoRA, caption format, ...) for that header check; captions are
    tokenised in ``caption_format`` (data/prompts.py), as the online path does.
    """
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"sidecar dtype {dtype!r}: use one of {EMBEDDING_DTYPES}")
    if not fields or len(set(fields)) != len(fields):
        raise ValueError(f"sidecar fields {list(fields)!r}: give at least one field, each once")
    names = [PurePosixPath(u).name for u in image_urls]
    if len(set(names)) != len(names):
        raise ValueError("image shards with the same file name would share one sidecar path; embed them separately")
    tp_size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    tp_rank = dist.get_rank(tp_group) if tp_size > 1 else 0
    tp_src = dist.get_global_rank(tp_group, 0) if tp_size > 1 else 0
    dim = int(tower.config.hidden_size)
    report = SidecarReport(writer=tp_rank == 0)
    mine = [i for i in range(len(image_urls)) if i % llm_dp_size == llm_dp_rank]
    for done, index in enumerate(mine, start=1):
        url = image_urls[index]
        path = sidecar_path(url, out_dir)
        header = make_header(url, fields, dim, dtype, max_text_len, source)
        started = time.perf_counter()
        plan: list = [None]
        if tp_rank == 0:  # one reader per group: all ranks then embed the very same captions
            if read_header(path) == header:
                plan[0] = ("reuse",)
            else:
                items, samples, whole = _captions_of_shard(url, fields)
                plan[0] = ("fail",) if samples == 0 and not whole else ("embed", items, samples, whole)
        if tp_size > 1:
            dist.broadcast_object_list(plan, src=tp_src, group=tp_group)
        action = plan[0]
        if action[0] == "reuse":
            report.reused.append(str(path))
            continue
        if action[0] == "fail":
            report.failed.append(url)
            if tp_rank == 0:
                logger.error("embed captions: %s cannot be read; no sidecar written", url)
            continue
        _, items, samples, whole = action
        vectors = _embed_items(tower, tokenizer, [c for _, _, c in items], max_text_len, batch_size, device,
                                   caption_format)
        if tp_rank == 0:
            if not whole:
                logger.warning("embed captions: %s is damaged; sidecar covers its %d readable samples", url, samples)
            write_sidecar(path, header, _group_records(items, vectors.astype(dtype)))
            elapsed = time.perf_counter() - started
            logger.info(
                "embed captions: [%d/%d] %s: %d samples, %d captions in %.1f s (%.0f captions/s)",
                done, len(mine), path, samples, len(items), elapsed, len(items) / max(elapsed, 1e-9),
            )
        report.written.append(str(path))
        report.samples += samples
        report.captions += len(items)
    return report


def _group_records(
    items: list[tuple[str, str, str]], vectors: np.ndarray
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(key, {field: vector}) in the order keys first appear: the image shard's order."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for (key, name, _), vector in zip(items, vectors):
        grouped.setdefault(key, {})[name] = vector
    yield from grouped.items()
