"""Training-loader throughput: this project's loader vs open_clip_train's webdataset pipeline, same shards, same work.

    python tools/bench_loader.py [--shards PATTERN --tokenizer DIR] [--image-size 224] [--batch-size 64]
        [--workers 1,2] [--warmup 4] [--batches 30] [--rounds 3] [--check] [--profile BATCHES]

Both loaders read the same shards with the same image transform (the project's ``ImageTransform`` with
``augment=none``: bicubic resize of the shorter side, center crop, to-tensor, CLIP normalisation: one object class,
so the pixel work is identical), the same tokenizer (the project's HF tokenizer through ``tokenize_captions`` in the
``plain`` format, padded to ``--max-text-len`` for open_clip, whose batcher stacks fixed-length rows), the same
caption text (open_clip reads the ``txt`` member, ours the json field ``--caption-field``; the tool checks they hold
the same string), the same batch size, DataLoader worker count and sample shuffle buffer (open_clip's module
constants ``_SAMPLE_SHUFFLE_SIZE``/``_SAMPLE_SHUFFLE_INITIAL`` are set to ours: ``--shuffle-buffer`` and webdataset's
default initial fill of 100). Differences the APIs leave:

- shards: ours always resamples (blocks of ``shuffle_block_shards`` distinct shards, drawn with replacement);
  open_clip runs with ``--dataset-resampled`` (shards drawn one at a time with replacement), its usual setting for
  large sets. Both shuffle samples in a buffer of the same size; ours drains it at each block end (exact resume).
- text: ours tokenises a batch in one call (dynamic padding, plus a pooling mask); open_clip's pipeline tokenises
  each sample on its own (``map_dict(text=tokenizer(text)[0])``), padded to the context length.
- per sample, ours also draws the caption field (``random.choices``, one field here) and counts skips; per batch it
  stamps its resume state (block, offset, RNG states, skip counts), which the DataLoader's ``default_convert`` then
  walks (~2 ms a batch). open_clip decodes every member (``wds.decode``: jpg, txt and json); ours parses the json
  and decodes the image.
- open_clip_train 3.3 as installed needs one shim, applied only while its pipeline is built: its tar reader gets
  ``eof_value=None`` (webdataset >= 0.2.96 ends each shard with an empty dict that its grouper fails on with
  ``KeyError: 'fname'``, webdataset#384 / open_clip#935).
- startup (reported apart, never in samples/s): building the loader and its first batch; ours loads the tokenizer
  inside each worker, open_clip in the main process before the workers fork; both are included.

Measurement: each run builds a fresh loader, takes the first batch (startup), ``--warmup`` more batches, then times
``--batches`` batches: samples/s (wall) and CPU ms per sample (the workers' and the main process' CPU time over the
timed window: steadier than wall time on a shared machine). Rounds alternate which loader goes first; the table gives
medians, min–max, the ratio ours/open_clip of the median samples/s, and the same ratio implied by CPU cost (open_clip's
CPU ms per sample over ours; the one to trust when other processes share the CPUs). ``--check`` first proves both
pipelines see the same samples: one full pass without resampling (ours: one block holding every shard; open_clip:
``dataset_resampled=False``, 0 workers) must yield the same multiset of keys, and per key equal image tensors and
token ids. ``--profile N`` runs N batches of each loader with 0 workers (one torch thread, as in a worker) under
cProfile timed in process CPU time, and prints the top costs and a table of ms per sample by stage.

Without ``--shards`` the tool writes a synthetic set (``--synthetic-*``: real-sized JPEGs so decoding dominates as in a
real run, coloured shapes on noisy gradients, captions and word-level tokenizer of ``llm2clip_scale.data.synthetic``)
into ``--data-dir`` (reused when complete with the same parameters) or a temporary directory. Shards given with
``--shards`` need a ``txt`` member (open_clip's caption) and a json with ``--caption-field`` holding the same text, as
img2dataset writes them (``--caption-field caption``).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import math
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as slurm/env.sh: loader workers fork

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from llm2clip_scale.config.load import expand_shards  # noqa: E402
from llm2clip_scale.config.schema import DataConfig  # noqa: E402
from llm2clip_scale.data.loader import build_train_loader  # noqa: E402
from llm2clip_scale.data.prompts import tokenize_captions  # noqa: E402
from llm2clip_scale.data.samples import ImageTransform, load_tokenizer  # noqa: E402
from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, read_shard  # noqa: E402
from llm2clip_scale.data.synthetic import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    describe_scene,
    draw_shape,
    sample_scene,
    train_tokenizer,
)

OURS, OPEN_CLIP = "ours", "open_clip"
WDS_SHUFFLE_INITIAL = 100  # webdataset's default initial fill, which our loader's wds.shuffle(bufsize) uses
_DATA_MARKER = "bench_data.json"


# ---------------------------------------------------------------------------------------------------- synthetic data


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def _synthetic_image(index: int, width: int, height: int, seed: int) -> tuple[bytes, dict[str, str]]:
    """One JPEG of a shapes scene on a noisy colour gradient (photo-like entropy) and its three captions."""
    rng = random.Random(f"bench-loader/{seed}/{index}")
    scene = sample_scene(rng)
    gen = np.random.default_rng([seed, index])
    low = Image.fromarray(gen.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    image = np.asarray(low, dtype=np.float32) + gen.normal(0, 10, (height, width, 3))
    tint = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    canvas = Image.fromarray(np.clip(0.6 * image + 0.4 * tint, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = width / 3, height / 3
    for obj in scene.objects:
        half = (0.45 if obj.size == "large" else 0.22) * min(cell_w, cell_h)
        cx, cy = (obj.col + 0.5) * cell_w, (obj.row + 0.5) * cell_h
        draw_shape(draw, obj.shape, cx, cy, half, COLOURS[obj.colour])
    jpeg = io.BytesIO()
    canvas.save(jpeg, format="JPEG", quality=90)
    return jpeg.getvalue(), describe_scene(scene, rng)


def write_synthetic_shards(
    out_dir: str | os.PathLike, shards: int, per_shard: int, min_size: tuple[int, int], max_size: tuple[int, int],
    seed: int = 0,
) -> tuple[str, str]:
    """Shards ``bench-%06d.tar`` (jpg, txt = the ``long`` caption, json with raw/short/long) and a tokenizer; returns
    (shard pattern, tokenizer dir). A complete set with the same parameters in ``out_dir`` is reused."""
    out = Path(out_dir)
    params = {"version": 2, "shards": shards, "per_shard": per_shard, "min_size": list(min_size),
              "max_size": list(max_size), "seed": seed}
    pattern = str(out / f"bench-{{000000..{shards - 1:06d}}}.tar")
    marker = out / _DATA_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return pattern, str(out / "tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    sizes = random.Random(f"bench-loader-sizes/{seed}")
    captions: list[str] = []
    for shard in range(shards):
        with wds.TarWriter(str(out / f"bench-{shard:06d}.tar"), mtime=0) as sink:
            for i in range(per_shard):
                index = shard * per_shard + i
                width = sizes.randint(min_size[0], max_size[0])
                height = sizes.randint(min_size[1], max_size[1])
                jpeg, meta = _synthetic_image(index, width, height, seed)
                captions += meta.values()
                sink.write({"__key__": f"s{index:08d}", "jpg": jpeg, "txt": meta["long"],
                            "json": json.dumps(meta).encode()})
    train_tokenizer(captions, out / "tokenizer")
    marker.write_text(json.dumps(params))  # last: its presence marks the set complete
    return pattern, str(out / "tokenizer")


def check_caption_member(url: str, caption_field: str) -> None:
    """open_clip reads ``txt``, ours the json field: the first sample of a shard must hold the same text in both."""
    sample = next(iter(read_shard(url, SkipCounter("bench"))), None)
    if sample is None or "txt" not in sample:
        raise SystemExit(f"{url}: no txt member in the first sample; open_clip's pipeline needs one")
    meta, _, _ = parse_meta(sample)
    wanted = caption_of(meta or {}, caption_field)
    if wanted != sample["txt"].decode("utf-8").strip():
        raise SystemExit(f"{url}: txt and json[{caption_field!r}] differ; pass --caption-field naming the txt text")


# ----------------------------------------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class Settings:
    """What both loaders share."""

    pattern: str
    tokenizer: str
    caption_field: str = "long"
    image_size: int = 224
    batch_size: int = 64
    max_text_len: int = 128
    shuffle_buffer: int = 1000
    seed: int = 0

    def data_config(self, workers: int, **extra) -> DataConfig:
        return DataConfig(train_shards=self.pattern, caption_fields={self.caption_field: 1.0}, num_workers=workers,
                          shuffle_buffer=self.shuffle_buffer, max_text_len=self.max_text_len, augment="none", **extra)

    def transform(self) -> ImageTransform:
        # The object our workers build for augment=none, with the same mean/std.
        cfg = self.data_config(0)
        return ImageTransform(self.image_size, cfg.image_mean, cfg.image_std, "none", None)


class OpenClipTokenizer:
    """The project's tokenizer with open_clip's call signature: ``tok(texts) -> (n, context_length)`` long ids.

    Same per-caption work as our collator (``tokenize_captions``, plain format); padded to the context length
    because open_clip's batcher stacks one row per sample."""

    def __init__(self, path: str, context_length: int) -> None:
        self.tokenizer = load_tokenizer(path)
        self.context_length = context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, _, _ = tokenize_captions(self.tokenizer, texts, "plain", max_len=self.context_length)
        out = torch.full((len(texts), self.context_length), self.tokenizer.pad_token_id, dtype=torch.long)
        out[:, : ids.shape[1]] = ids
        return out


def _open_clip_data():
    """``open_clip_train.data`` (imports pandas, which the ``test`` extra installs for it)."""
    from open_clip_train import data

    return data


def _tarfile_to_samples_nothrow(src, handler=None):
    """open_clip's ``tarfile_to_samples_nothrow`` with ``eof_value=None``: webdataset >= 0.2.96 ends each shard with an
    empty dict, which open_clip's grouper (written for the webdataset <= 0.2.86 it pins) fails on with KeyError
    'fname' (webdataset/webdataset#384, mlfoundations/open_clip#935; this is the fix given there)."""
    from webdataset.tariterators import tar_file_expander, url_opener

    ocd = _open_clip_data()
    handler = handler or ocd.log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return ocd.group_by_keys_nothrow(files, handler=handler)


@contextmanager
def _open_clip_patched(bufsize: int, initial: int):
    """While open_clip builds its pipeline: our shuffle sizes (module constants read at build time) and the
    webdataset-1.x-compatible tar reader (a module global looked up at build time)."""
    ocd = _open_clip_data()
    saved = ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL, ocd.tarfile_to_samples_nothrow
    ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL = bufsize, initial
    ocd.tarfile_to_samples_nothrow = _tarfile_to_samples_nothrow
    try:
        yield
    finally:
        ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL, ocd.tarfile_to_samples_nothrow = saved


def build_ours(settings: Settings, workers: int, **extra):
    """``build_train_loader`` in online mode (tokenising in the workers), rank 0 of 1."""
    return build_train_loader(settings.data_config(workers, **extra), settings.tokenizer, settings.image_size,
                              settings.batch_size, rank=0, world_size=1, seed=settings.seed,
                              max_text_len=settings.max_text_len)


def build_open_clip(settings: Settings, workers: int, resampled: bool = True, num_samples: int | None = None):
    """``open_clip_train.data.get_wds_dataset`` with an argparse-like namespace, as open_clip's training uses it."""
    get_wds_dataset = _open_clip_data().get_wds_dataset
    urls = expand_shards(settings.pattern)
    if num_samples is None:  # an epoch long enough never to end inside a run
        num_samples = settings.batch_size * max(workers, 1) * 10_000
    args = argparse.Namespace(
        train_data="::".join(urls), val_data=None, dataset_resampled=resampled, train_num_samples=num_samples,
        train_data_upsampling_factors=None, seed=settings.seed, batch_size=settings.batch_size, world_size=1,
        workers=workers,
    )
    tokenizer = OpenClipTokenizer(settings.tokenizer, settings.max_text_len)
    with _open_clip_patched(settings.shuffle_buffer, WDS_SHUFFLE_INITIAL):
        info = get_wds_dataset(args, settings.transform(), is_train=True, epoch=0, tokenizer=tokenizer)
    return info.dataloader


def batch_parts(kind: str, batch) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(images, token ids, keys or None) of either loader's batch."""
    if kind == OURS:
        return batch["images"], batch["input_ids"], batch["keys"]
    return batch[0], batch[1], None


# ------------------------------------------------------------------------------------------------------ measurement


@dataclass
class Run:
    loader: str
    workers: int
    startup_s: float
    samples_per_s: float
    cpu_ms_per_sample: float
    samples: int
    image_shape: tuple[int, ...]
    text_rows: int


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a worker that already exited: its time is lost, not an error
            pass
    return total


def _wait_for_children(timeout: float = 30.0) -> None:
    """The previous run's workers must be gone before the next run starts: they would share the CPUs."""
    deadline = time.monotonic() + timeout
    while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)


def _close(loader, iterator) -> None:
    if hasattr(iterator, "close"):
        iterator.close()  # ours: a generator; closing it drops its DataLoader iterator and stops the workers
    pipeline = getattr(loader, "pipeline", None)  # open_clip: WebLoader around a DataLoader with persistent workers
    inner = getattr(pipeline[0], "_iterator", None) if pipeline else None
    if inner is not None and hasattr(inner, "_shutdown_workers"):
        inner._shutdown_workers()
    del loader, iterator
    gc.collect()
    _wait_for_children()


@contextmanager
def _worker_threads(workers: int):
    """With 0 workers the loading runs in this process: give it one torch thread, as DataLoader gives each worker
    (several intra-op threads on per-image tensor ops only spin against each other on a busy machine)."""
    saved = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def measure(kind: str, settings: Settings, workers: int, warmup: int, batches: int) -> Run:
    """One fresh loader: startup (build + first batch), ``warmup`` batches, then ``batches`` timed batches."""
    with _worker_threads(workers):
        return _measure(kind, settings, workers, warmup, batches)


def _measure(kind: str, settings: Settings, workers: int, warmup: int, batches: int) -> Run:
    gc.collect()
    start = time.perf_counter()
    loader = build_ours(settings, workers) if kind == OURS else build_open_clip(settings, workers)
    iterator = iter(loader)
    next(iterator)
    startup = time.perf_counter() - start
    for _ in range(warmup):
        next(iterator)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    cpu0, t0 = _cpu_seconds(procs), time.perf_counter()
    samples, shape, rows = 0, (), 0
    for _ in range(batches):
        images, ids, _ = batch_parts(kind, next(iterator))
        samples += images.shape[0]
        shape, rows = tuple(images.shape[1:]), rows + ids.shape[0]
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(procs) - cpu0
    _close(loader, iterator)
    return Run(kind, workers, startup, samples / elapsed, 1e3 * cpu / max(samples, 1), samples, shape, rows)


def benchmark(settings: Settings, workers: list[int], warmup: int, batches: int, rounds: int,
              log=print) -> list[Run]:
    runs: list[Run] = []
    for round_ in range(rounds):
        for count in workers:
            order = (OURS, OPEN_CLIP) if (round_ + count) % 2 == 0 else (OPEN_CLIP, OURS)
            for kind in order:
                run = measure(kind, settings, count, warmup, batches)
                log(f"round {round_ + 1}/{rounds} {kind:<9} workers {count}: {run.samples_per_s:8.1f} samples/s, "
                    f"{run.cpu_ms_per_sample:6.2f} CPU ms/sample, startup {run.startup_s:5.2f} s")
                runs.append(run)
    return runs


@dataclass
class Row:
    loader: str
    workers: int
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)
    samples: set[int] = field(default_factory=set)
    shapes: set[tuple[int, ...]] = field(default_factory=set)


def summarize(runs: list[Run]) -> dict[tuple[str, int], Row]:
    rows: dict[tuple[str, int], Row] = {}
    for run in runs:
        row = rows.setdefault((run.loader, run.workers), Row(run.loader, run.workers))
        row.rates.append(run.samples_per_s)
        row.cpu.append(run.cpu_ms_per_sample)
        row.startups.append(run.startup_s)
        row.samples.add(run.samples)
        row.shapes.add(run.image_shape)
    return rows


def format_table(rows: dict[tuple[str, int], Row], settings: Settings) -> str:
    head = ("| loader | workers | batch | image | samples/s median | min–max | CPU ms/sample median | min–max "
            "| startup s median | ours/open_clip samples/s | ours/open_clip by CPU |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (kind, workers), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0] != OURS)):
        rate, cpu = statistics.median(row.rates), statistics.median(row.cpu)
        other = rows.get((OPEN_CLIP, workers))
        ratio = f"{rate / statistics.median(other.rates):.2f}" if kind == OURS and other else ""
        # Throughput ratio implied by CPU cost (open_clip's ms per sample over ours): what the wall ratio would be
        # on an otherwise idle machine where the loader is CPU-bound.
        # (A tiny run can take less than one clock tick of CPU: no ratio then.)
        by_cpu = f"{statistics.median(other.cpu) / cpu:.2f}" if kind == OURS and other and cpu > 0 else ""
        lines.append(
            f"| {kind} | {workers} | {settings.batch_size} | {settings.image_size} | {rate:.1f} | "
            f"{min(row.rates):.1f}–{max(row.rates):.1f} | {cpu:.2f} | {min(row.cpu):.2f}–{max(row.cpu):.2f} | "
            f"{statistics.median(row.startups):.2f} | {ratio} | {by_cpu} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- like with like


def _first_samples(kind: str, loader, total: int) -> list[tuple[str | None, torch.Tensor, torch.Tensor]]:
    """(key or None, image, token ids) of the first ``total`` samples in stream order (open_clip's tuples carry no key,
    see ``same_samples``)."""
    out: list[tuple[str | None, torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        images, ids, keys = batch_parts(kind, batch)
        for i in range(images.shape[0]):
            out.append((keys[i] if keys else None, images[i], ids[i]))
        if len(out) >= total:
            break
    return out[:total]


def _trim(ids: torch.Tensor, pad: int) -> list[int]:
    row = ids.tolist()
    while row and row[-1] == pad:
        row.pop()
    return row


def count_samples(pattern: str) -> list[str]:
    skips = SkipCounter("bench")
    return [sample["__key__"] for url in expand_shards(pattern) for sample in read_shard(url, skips)]


def same_samples(settings: Settings) -> dict:
    """One full pass without resampling through both pipelines (0 workers): the same samples, pixel for pixel.

    Ours: one shuffle block holding every shard once (``shuffle_block_shards`` = shard count), first N samples.
    open_clip: ``dataset_resampled=False`` (shard shuffle, split by node/worker), epoch of N samples, with a batch size
    that divides N (its training batcher drops a partial batch). open_clip's batches carry no keys, so each of its
    (image, ids) pairs is matched to ours by content: the multiset of keys is equal iff every pair finds a distinct
    key of ours with the identical image tensor and token ids, and every key appears.
    """
    keys = count_samples(settings.pattern)
    total = len(keys)
    batch = math.gcd(total, settings.batch_size)
    local = dataclasses.replace(settings, batch_size=batch)
    shards = len(expand_shards(settings.pattern))
    ours_loader = build_ours(local, 0, shuffle_block_shards=shards)
    ours = _first_samples(OURS, ours_loader, total)
    theirs = _first_samples(OPEN_CLIP, build_open_clip(local, 0, resampled=False, num_samples=total), total)
    pad = load_tokenizer(settings.tokenizer).pad_token_id
    by_content: dict[tuple, list[str]] = {}
    for key, image, ids in ours:
        by_content.setdefault((image.numpy().tobytes(), tuple(_trim(ids, pad))), []).append(key)
    matched: list[str] = []
    unmatched = 0
    for _, image, ids in theirs:
        candidates = by_content.get((image.numpy().tobytes(), tuple(_trim(ids, pad))))
        if candidates:
            matched.append(candidates.pop())
        else:
            unmatched += 1
    return {
        "samples": total,
        "ours": len(ours),
        "open_clip": len(theirs),
        "ours_keys_equal_shards": Counter(key for key, _, _ in ours) == Counter(keys),
        "matched": len(matched),
        "unmatched": unmatched,
        "same": Counter(matched) == Counter(keys) and unmatched == 0 and len(theirs) == total,
        "check_batch": batch,
    }


# --------------------------------------------------------------------------------------------------------- profiling


STAGES = ("read shards", "decode", "json + caption draw", "image transform", "tokenise", "stack batch")


def _stage_functions(kind: str) -> dict[str, list]:
    """The functions whose cumulative time is each stage's cost (None: a builtin named by its pstats label)."""
    from webdataset import autodecode

    from llm2clip_scale.data import prompts, samples, shards

    stack = [("~", 0, "<built-in method torch.stack>")]
    if kind == OURS:
        return {
            "read shards": [shards.read_shard],
            "decode": [samples._decode_image],
            "json + caption draw": [samples._caption_options, samples._pick_caption],
            "image transform": [samples.ImageTransform.__call__],
            "tokenise": [prompts.tokenize_captions],
            "stack batch": stack,
        }
    return {
        "read shards": [_open_clip_data().group_by_keys_nothrow],
        "decode": [autodecode.Decoder.decode],  # every member: jpg, json and txt
        "image transform": [samples.ImageTransform.__call__],
        "tokenise": [OpenClipTokenizer.__call__],
        "stack batch": stack,
    }


def _stage_seconds(stats: pstats.Stats, kind: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for stage, functions in _stage_functions(kind).items():
        total = 0.0
        for function in functions:
            if isinstance(function, tuple):
                key = function
            else:
                code = getattr(function, "__code__", None)
                if code is None:
                    continue
                key = (code.co_filename, code.co_firstlineno, code.co_name)
            entry = stats.stats.get(key)  # (primitive calls, calls, tottime, cumtime, callers)
            total += entry[3] if entry else 0.0
        out[stage] = total
    out["total"] = stats.total_tt
    return out


def profile(settings: Settings, batches: int, top: int = 18) -> tuple[dict[str, str], str]:
    """cProfile (process CPU time) of ``batches`` batches of each loader with 0 workers (all work in this process),
    after one batch of warm-up, one torch thread as in a worker: per loader the top costs by internal time, and a
    table of ms per sample by stage (cumulative time of the stage's functions; "other": the pipelines' plumbing)."""
    reports: dict[str, str] = {}
    stages: dict[str, dict[str, float]] = {}
    with _worker_threads(0):
        for kind in (OURS, OPEN_CLIP):
            stats, reports[kind] = _profile_one(kind, settings, batches, top)
            stages[kind] = _stage_seconds(stats, kind)
    per_sample = 1e3 / (batches * settings.batch_size)
    lines = ["| stage (cProfile, 0 workers) | ours ms/sample | open_clip ms/sample |", "|---|---:|---:|"]
    for stage in (*STAGES, "other", "total"):
        cells = []
        for kind in (OURS, OPEN_CLIP):
            known = stages[kind]
            if stage == "other":
                value = known["total"] - sum(known.get(name, 0.0) for name in STAGES)
            else:
                value = known.get(stage)
            cells.append("in decode" if value is None else f"{value * per_sample:.2f}")
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} |")
    return reports, "\n".join(lines)


def _profile_one(kind: str, settings: Settings, batches: int, top: int) -> tuple[pstats.Stats, str]:
    loader = build_ours(settings, 0) if kind == OURS else build_open_clip(settings, 0)
    iterator = iter(loader)
    next(iterator)
    profiler = cProfile.Profile(time.process_time)  # CPU time: a shared machine's descheduling does not count
    profiler.enable()
    for _ in itertools.repeat(None, batches):
        next(iterator)
    profiler.disable()
    _close(loader, iterator)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return stats, text.getvalue()


# --------------------------------------------------------------------------------------------------------------- cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="shard pattern (default: a synthetic set, see --synthetic-*)")
    parser.add_argument("--tokenizer", help="HF tokenizer dir (required with --shards)")
    parser.add_argument("--caption-field", default="long",
                        help="json field ours reads; must hold the txt member's text (synthetic set: long)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--warmup", type=int, default=4, help="batches after the first, not timed")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="sample shuffle buffer of both loaders")
    parser.add_argument("--max-text-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="first check that both pipelines see the same samples (one full pass: a small set)")
    parser.add_argument("--profile", type=int, default=0, metavar="BATCHES",
                        help="then cProfile BATCHES batches of each loader with 0 workers")
    parser.add_argument("--data-dir", help="where the synthetic set is written/reused (default: a temp dir)")
    parser.add_argument("--synthetic-shards", type=int, default=2)
    parser.add_argument("--synthetic-per-shard", type=int, default=1000)
    parser.add_argument("--synthetic-min-size", type=_size, default=(320, 240), help="WxH")
    parser.add_argument("--synthetic-max-size", type=_size, default=(640, 480), help="WxH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    temp = None
    if args.shards:
        if not args.tokenizer:
            raise SystemExit("--shards needs --tokenizer (the HF tokenizer both loaders use)")
        pattern, tokenizer = args.shards, args.tokenizer
    else:
        data_dir = args.data_dir or (temp := tempfile.mkdtemp(prefix="bench_loader_"))
        start = time.perf_counter()
        pattern, tokenizer = write_synthetic_shards(data_dir, args.synthetic_shards, args.synthetic_per_shard,
                                                    args.synthetic_min_size, args.synthetic_max_size, args.seed)
        print(f"data: {pattern} ({args.synthetic_shards} x {args.synthetic_per_shard} JPEGs "
              f"{args.synthetic_min_size[0]}x{args.synthetic_min_size[1]}..{args.synthetic_max_size[0]}x"
              f"{args.synthetic_max_size[1]}, ready in {time.perf_counter() - start:.1f} s)")
    try:
        check_caption_member(expand_shards(pattern)[0], args.caption_field)
        settings = Settings(pattern, tokenizer, args.caption_field, args.image_size, args.batch_size,
                            args.max_text_len, args.shuffle_buffer, args.seed)
        if args.check:
            result = same_samples(settings)
            print(f"same samples: {result['same']} ({result['matched']} of {result['samples']} open_clip samples "
                  f"matched to a distinct key of ours with identical image and token ids; ours saw every key once: "
                  f"{result['ours_keys_equal_shards']})")
            if not result["same"]:
                return 1
        print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
              f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}", flush=True)
        runs = benchmark(settings, workers, args.warmup, args.batches, args.rounds,
                         log=lambda line: print(line, flush=True))
        rows = summarize(runs)
        print()
        print(format_table(rows, settings))
        delivered = {(row.loader, row.workers): (sorted(row.samples), sorted(row.shapes)) for row in rows.values()}
        print(f"samples per timed run and image shape: {delivered}")
        if args.profile:
            reports, table = profile(settings, args.profile)
            for kind, report in reports.items():
                print(f"\n=== cProfile, {kind}, 0 workers, {args.profile} batches (by internal time) ===")
                print(report)
            print(table)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
