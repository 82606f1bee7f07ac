"""Writing sidecar shards (format and reading: :mod:`llm2clip_scale.data.sidecar`): offline stage 2's embedding step.

:func:`write_sidecars` embeds the captions of whole image shards with a (tensor-parallel) text tower; the CLI is
``data_prep/embed_captions.py``. :func:`embed_caption_texts` is its embedding step: captions tokenised a window at
a time, sorted by token count so each batch pads only to similar lengths, vectors returned in the original order.
:func:`encode_embeddings` makes the stored form of each dtype, and :func:`write_sidecar` writes one file.

Sidecars are written whole under a temporary name (``.X.tar.tmp-<pid>``, flushed to disk) and renamed, so a
sidecar that exists under its own name is complete; a killed job leaves at most such a hidden temporary file, which
no reader or restart ever opens.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, read_shard
from llm2clip_scale.data.sidecar import (
    DEFAULT_EMBEDDING_DTYPE,
    EMBEDDING_DTYPES,
    HEADER_MEMBER,
    STORAGE_DTYPES,
    make_header,
    read_header,
    sidecar_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("llm2clip_scale.data")  # the reading module's logger: one name for the sidecar messages

# Captions tokenised and length-sorted together by embed_caption_texts (rounded up to whole batches): bounds the
# padded id tensors (window x max_text_len) while leaving each batch among near-equal lengths.
DEFAULT_SORT_WINDOW = 4096


def encode_embeddings(vectors: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Float vectors (any shape) as stored in a sidecar of header ``dtype`` (table: :mod:`llm2clip_scale.data.sidecar`).

    bfloat16 rounds with torch's own conversion (round to nearest even) and keeps the bit pattern as uint16.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"sidecar dtype {dtype!r}: use one of {EMBEDDING_DTYPES}")
    if dtype == "bfloat16":
        tensor = torch.as_tensor(vectors).detach().cpu().to(torch.bfloat16).contiguous()
        return tensor.view(torch.int16).numpy().view(np.uint16)
    array = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    return array.astype(STORAGE_DTYPES[dtype])


# A test hook, read when a sidecar is written: "K" makes this process SIGKILL itself while writing its (K+1)-th
# sidecar, after the header and first record are on disk — a kill at the worst moment, placed deterministically
# (tests/test_offline_embeddings.py). Unset in any real run.
KILL_HOOK_ENV = "LLM2CLIP_SCALE_TEST_SIGKILL_AFTER_SIDECARS"
_sidecars_written = 0  # by this process, for the hook


def _maybe_kill_mid_write(fh: io.BufferedWriter) -> None:
    after = os.environ.get(KILL_HOOK_ENV)
    if after is not None and int(after) == _sidecars_written:
        import signal

        fh.flush()  # the partial temporary file is on disk, as a kill mid-write would leave it
        os.kill(os.getpid(), signal.SIGKILL)


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of ``path``'s temporary files while it is written (hidden; never matched as a shard)."""
    return f".{Path(path).name}.tmp-"


def write_sidecar(
    path: str | os.PathLike, header: dict, records: Iterable[tuple[str, dict[str, np.ndarray]]]
) -> None:
    """Write a sidecar atomically: a temporary name in the same directory, flushed to disk, renamed once complete.

    ``records`` are (key, {field: 1-D array}) in image-shard order; arrays are stored in the dtype they come in
    (:func:`encode_embeddings` makes the stored form).
    """
    global _sidecars_written
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{temp_prefix(path)}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:  # PAX: no 100-char limit
                _add_member(tar, HEADER_MEMBER, json.dumps(header, sort_keys=True).encode())
                for count, (key, vectors) in enumerate(records):
                    if "." in key:
                        raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
                    for name, vector in vectors.items():
                        buf = io.BytesIO()
                        np.save(buf, np.ascontiguousarray(vector), allow_pickle=False)
                        _add_member(tar, f"{key}.{name}.npy", buf.getvalue())
                    if count == 0:
                        _maybe_kill_mid_write(fh)
            fh.flush()
            # On disk before the name appears: "the sidecar exists" then means "complete" after a node crash too.
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers and restarts see nothing or the whole sidecar
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sidecars_written += 1


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # same inputs, same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


@dataclass
class EmbedStats:
    """Token accounting of :func:`embed_caption_texts`: real tokens and the padding the batches carried."""

    captions: int = 0
    batches: int = 0
    tokens: int = 0  # real (attended) tokens: BOS/EOS, instruction and caption
    positions: int = 0  # rows x batch length summed over batches: what the tower computed

    @property
    def padding(self) -> int:
        return self.positions - self.tokens

    def add(self, other: EmbedStats) -> None:
        self.captions += other.captions
        self.batches += other.batches
        self.tokens += other.tokens
        self.positions += other.positions


@dataclass
class SidecarReport:
    """What one rank's call of :func:`write_sidecars` did; every rank of a TP group reports the same shards."""

    written: list[str] = field(default_factory=list)  # sidecar paths (re)computed by this rank's TP group
    reused: list[str] = field(default_factory=list)  # complete sidecars with matching headers left alone
    failed: list[str] = field(default_factory=list)  # image shards that could not be read at all
    samples: int = 0
    captions: int = 0
    writer: bool = False  # this rank is TP rank 0 of its group: the one that writes files
    stats: EmbedStats = field(default_factory=EmbedStats)  # tokens and padding of the shards embedded


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


@torch.no_grad()
def embed_caption_texts(
    tower: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    max_text_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    caption_format: str = "plain",
    sort_window: int = DEFAULT_SORT_WINDOW,
    stats: EmbedStats | None = None,
) -> np.ndarray:
    """(n, hidden) float32 embeddings of ``captions``, in their order. Collective over the tower's TP group.

    Length bucketing: ``sort_window`` captions at a time (rounded up to whole batches) are tokenised together, as the
    online loader tokenises (``caption_format``, ``max_text_len``), then sorted by token count, longest first, and
    cut into batches of ``batch_size`` rows, each trimmed to its own longest row. Padding is masked out of attention
    and pooling, so a caption's vector does not depend on its batch (to float rounding: other batch shapes take other
    kernel paths). ``sort_window=0`` keeps the given order (batches of consecutive captions: the reference).
    ``stats`` (if given) accumulates real tokens and computed positions.
    """
    from llm2clip_scale.data.prompts import tokenize_captions
    from llm2clip_scale.models.llm.embed import TextBatch, embed_texts

    if batch_size < 1 or sort_window < 0:
        raise ValueError(f"batch_size {batch_size} must be >= 1 and sort_window {sort_window} >= 0")
    hidden = int(tower.config.hidden_size)
    out = np.zeros((len(captions), hidden), dtype=np.float32)
    window = -(-sort_window // batch_size) * batch_size if sort_window else batch_size
    for start in range(0, len(captions), window):
        # Every TP rank tokenises the same captions (broadcast by TP rank 0) with a deterministic tokenizer, so all
        # ranks form the very same batches: TP's contract.
        texts = TextBatch(*tokenize_captions(tokenizer, list(captions[start : start + window]), caption_format,
                                             max_len=max_text_len))
        lengths = texts.attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True) if sort_window else torch.arange(len(texts))
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = texts.select(rows).trimmed()
            out[start + rows.numpy()] = embed_texts(tower, batch.to(device)).cpu().numpy()
            if stats is not None:
                stats.add(EmbedStats(len(rows), 1, int(lengths[rows].sum()), len(rows) * batch.length))
    return out


def _stale_temp_files(out_dir: Path, paths: Sequence[Path]) -> list[str]:
    """Temporary files a killed run left for these sidecars (one directory listing, not one glob per shard)."""
    prefixes = tuple(temp_prefix(path) for path in paths)
    try:
        return sorted(entry.name for entry in os.scandir(out_dir) if entry.name.startswith(prefixes))
    except FileNotFoundError:
        return []


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
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
    device: torch.device | str = "cpu",
    source: dict | None = None,
    caption_format: str = "plain",
    sort_window: int = DEFAULT_SORT_WINDOW,
) -> SidecarReport:
    """Embed the ``fields`` captions of whole image shards with ``tower`` and write one sidecar per shard.

    Collective over ``tp_group`` (the tower's tensor-parallel group, PP = 1): shard i belongs to LLM-data-parallel
    group ``i % llm_dp_size``. TP rank 0 reads the shard and broadcasts its captions, so every rank of the group runs
    identical inputs; only TP rank 0 writes, atomically. A sidecar that already exists with the same header
    (fields, size, dtype, max_text_len, ``source``) is kept, so a restarted job redoes only unfinished shards.
    ``source`` describes the model (checkpoint, seed, LoRA, caption format, ...) for that header check; captions are
    tokenised in ``caption_format`` (data/prompts.py), as the online path does, and batched by length within
    ``sort_window`` captions of a shard (:func:`embed_caption_texts`). Vectors are stored as ``dtype``.
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
    if tp_rank == 0:
        stale = _stale_temp_files(Path(out_dir), [sidecar_path(image_urls[i], out_dir) for i in mine])
        if stale:
            logger.warning("embed captions: %d temporary file(s) of killed runs in %s (e.g. %s): never read as "
                           "sidecars; delete them once no job writes there", len(stale), out_dir, stale[0])
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
        stats = EmbedStats()
        vectors = embed_caption_texts(tower, tokenizer, [c for _, _, c in items], max_text_len, batch_size, device,
                                      caption_format, sort_window, stats)
        if tp_rank == 0:
            if not whole:
                logger.warning("embed captions: %s is damaged; sidecar covers its %d readable samples", url, samples)
            write_sidecar(path, header, _group_records(items, encode_embeddings(vectors, dtype)))
            elapsed = time.perf_counter() - started
            logger.info(
                "embed captions: [%d/%d] %s: %d samples, %d captions, %d tokens (+%.0f%% padding) in %.1f s "
                "(%.0f captions/s, %.0f tokens/s)", done, len(mine), path, samples, len(items), stats.tokens,
                100.0 * stats.padding / max(stats.tokens, 1), elapsed, len(items) / max(elapsed, 1e-9),
                stats.tokens / max(elapsed, 1e-9),
            )
        report.written.append(str(path))
        report.samples += samples
        report.captions += len(items)
        report.stats.add(stats)
    return report


def _group_records(
    items: list[tuple[str, str, str]], vectors: np.ndarray
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(key, {field: vector}) in the order keys first appear: the image shard's order."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for (key, name, _), vector in zip(items, vectors):
        grouped.setdefault(key, {})[name] = vector
    yield from grouped.items()
