"""Sidecar shards: precomputed LLM caption embeddings that travel beside the image shards (offline stage 2).

Format
------
For every image shard ``X.tar`` there is one sidecar tar, by convention ``<embeddings dir>/X.tar``:

- first member ``__sidecar__`` (no dot, so every webdataset-style reader ignores it): a json header
  ``{"format": 1, "image_shard": "X.tar", "fields": [...], "embedding_dim": d, "dtype": "bfloat16",
  "max_text_len": L, "source": {...}}``. It lets a restarted embedding job tell a finished sidecar made with the
  same settings from one it must redo.
- then, for each sample key of ``X.tar`` in the same order, one member ``<key>.<field>.npy`` per caption field
  the sample's json holds (non-blank) among ``fields``: a 1-D numpy array of ``embedding_dim`` values
  (``numpy.save``, no pickle), the mean-pooled tower output for the stripped caption text
  (:func:`llm2clip_scale.data.shards.caption_of`) tokenised with right padding and ``max_text_len`` truncation.
  A sample without any such field has no members. Keys follow webdataset's rule (member name up to the first dot of
  its base name), so keys hold no dots; field names may.

The header's ``dtype`` names how the vectors are stored, and each member's npy dtype says the same on its own:

================  =============  ============================================================================
header ``dtype``  npy dtype      values
================  =============  ============================================================================
``bfloat16``      ``uint16``     the bfloat16 bit pattern (numpy has no bfloat16): the upper 16 bits of the
                                 float32, rounded to nearest-even as ``torch.Tensor.to(torch.bfloat16)`` does;
                                 decoded exactly by ``(u16.astype(uint32) << 16).view(float32)``. The default.
``float16``       ``float16``    IEEE half (sidecars written before bfloat16 existed are all of this kind)
``float32``       ``float32``    the tower's float32 output as computed
================  =============  ============================================================================

bfloat16 keeps float32's exponent range (float16 overflows past 65504) at float16's size, with 8 significant bits
(relative rounding error at most 2^-8, float16's 2^-11). The format number stays 1: float16 and float32 sidecars are
byte-for-byte what they were, and a reader that predates bfloat16 counts a ``uint16`` member as ``bad_embedding``
rather than misreading it. :func:`decode_embedding` (and :class:`EmbeddingDecoder`, which the loaders and the shard
validator use) turns every stored dtype into float32.

A sidecar that exists under its own name is complete: it is written whole under a hidden temporary name
(``.X.tar.tmp-<pid>``) and renamed, and no reader or restart ever opens such a temporary file.

Reading
-------
The loaders read image shard i and sidecar i together and join samples by key (:func:`read_paired_shards`), with a
bounded look-ahead so a sidecar with a missing or reordered record never shifts embeddings onto other images. What
cannot be matched is skipped and counted, never misaligned:

- ``missing_embedding``: no sidecar record for the key (key mismatch), or no member for the drawn caption field.
- ``wrong_embedding_dim``: a vector of another size than expected; the first one per process is also logged with the
  shard and both sizes.
- ``bad_embedding``: a member that is not a finite 1-D npy array of a stored dtype above.
- ``sidecar_read_error``: a sidecar shard that cannot be opened or read to its end (one count per shard; its image
  samples after the damage then count as ``missing_embedding``).

Writing
-------
:mod:`llm2clip_scale.data.sidecar_writer` (a text tower, length-bucketed batches, atomic files; the CLI is
``data_prep/embed_captions.py``). It is kept apart so that the loaders and the shard validator, which only read,
import neither the tower nor ``torch.distributed``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from llm2clip_scale.data.shards import SkipCounter, read_shard

logger = logging.getLogger("llm2clip_scale.data")

SIDECAR_FORMAT = 1
HEADER_MEMBER = "__sidecar__"
EMBEDDINGS_KEY = "__embeddings__"  # sample entry the paired reader adds: {field: npy bytes}
SIDECAR_URL_KEY = "__sidecar_url__"
EMBEDDING_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")  # header "dtype" values; first: default
DEFAULT_EMBEDDING_DTYPE = EMBEDDING_DTYPES[0]
# How each header dtype is held in the npy members (numpy has no bfloat16: its bit pattern as uint16).
STORAGE_DTYPES: dict[str, np.dtype] = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16),
                                       "float32": np.dtype(np.float32)}
STORED_NAMES = frozenset(dtype.name for dtype in STORAGE_DTYPES.values())
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


def decode_embedding(array: np.ndarray) -> np.ndarray:
    """A stored vector as float32, whatever dtype it was stored in (uint16 = bfloat16 bits; exact for all three).

    Raises ValueError for an array of any other dtype.
    """
    if array.dtype.name == "uint16":  # by name: any byte order (astype reads it right)
        return (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if array.dtype.name in ("float16", "float32"):
        return array.astype(np.float32)
    raise ValueError(f"{array.dtype.name} is not a sidecar vector dtype (uint16 = bfloat16, float16, float32)")


class EmbeddingDecoder:
    """One process's check of sidecar vectors: npy → float32 tensor of ``expected_dim``, or a counted skip.

    Every stored dtype (bfloat16 bits, float16, float32; :func:`decode_embedding`) decodes to float32 exactly.

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
        if array.ndim != 1 or array.dtype.name not in STORED_NAMES:
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
        vector = torch.from_numpy(decode_embedding(array))
        if not torch.isfinite(vector).all():
            skips.add("bad_embedding", f"{key} ({field})", "non-finite values")
            return None
        return vector


# ------------------------------------------------------------------------------------------------------------ header


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
