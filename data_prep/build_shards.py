"""Build webdataset shards from image–caption manifests (parquet, jsonl, csv), restartable, with a dataset index.

    python data_prep/build_shards.py MANIFEST [MANIFEST ...] --out DIR [--captions raw=alt,short=short_caption]
        [--samples-per-shard 10000] [--max-size 512] [--workers N] [--part I/N] [--index-only]

The command line only: the manifest formats and the row→shard rule (global row i goes to shard i // S) are
:mod:`llm2clip_scale.data.manifests`; the samples, the stats files, what "complete" means on disk and why the bytes
are deterministic are :mod:`llm2clip_scale.data.shard_build`.

Restart: a rerun keeps finished shards, removes stale temporary files of its own shards and rebuilds the rest, so an
interrupted-and-restarted build equals an uninterrupted one byte for byte, whatever ``--workers`` and ``--part``
(:mod:`llm2clip_scale.data.parts`) were. ``DIR/index.json`` (:mod:`llm2clip_scale.data.index`) is written last, by
whichever process finds every shard of the full range complete, or by ``--index-only``.

Exit status: 0 done (index written or waiting for other parts), 1 a shard failed or ``--index-only`` found the set
incomplete, 2 bad arguments or a manifest that cannot be used (named in the message).
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llm2clip_scale.data.index import INDEX_NAME, write_index
from llm2clip_scale.data.manifests import Manifest, ManifestError, ShardJob, plan_manifests, shard_jobs
from llm2clip_scale.data.parts import parse_part, part_slice
from llm2clip_scale.data.shard_build import (
    RESERVED_FIELDS,
    BuildConfig,
    SettingsMismatch,
    assemble_index,
    build_in_worker,
    check_settings,
    init_worker,
    jobs_from_settings,
    read_columns,
    read_stats,
    stats_name,
    temp_owner,
)


def _parse_captions(text: str) -> dict[str, str]:
    captions: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, column = item.partition("=")
        name, column = name.strip(), (column.strip() if sep else name.strip())
        if not name or not column:
            raise ValueError(f"--captions: {item!r} is not field=column")
        if name in RESERVED_FIELDS:
            raise ValueError(f"--captions: {name!r} is reserved for the image size")
        captions[name] = column
    if not captions:
        raise ValueError("--captions: name at least one field=column")
    return captions


def _parse_meta_columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _default_workers() -> int:
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def _expand(patterns: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = sorted(glob.glob(pattern))
            if not found:
                raise ManifestError(f"{pattern}: matches no manifest file")
            paths.extend(found)
        else:
            paths.append(pattern)
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="*", help=".parquet/.jsonl/.csv files, in order (globs are expanded, "
                        "sorted); optional with --index-only")
    parser.add_argument("--out", required=True, help="output directory of the shards, stats and index.json")
    parser.add_argument("--image-column", default="image",
                        help="column with the image: a path (relative to the manifest's folder or --image-root) "
                        "or the encoded bytes (parquet binary column)")
    parser.add_argument("--image-root", default=None, help="folder that relative image paths are resolved against")
    parser.add_argument("--captions", default="raw=caption",
                        help="json field=manifest column, comma-separated (default raw=caption)")
    parser.add_argument("--key-column", default=None,
                        help="column with the sample key (no '.' or '/'); default: the global row number")
    parser.add_argument("--meta-columns", default="", help="comma-separated columns copied into the json as is")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="manifest rows per shard")
    parser.add_argument("--max-size", type=int, default=512,
                        help="shorter side resized down to this, aspect kept, never up (0 = keep)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--prefix", default="train", help="shard names {prefix}-NNNNNN.tar")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes, one shard each (default SLURM_CPUS_PER_TASK or the usable cores)")
    parser.add_argument("--part", default="0/1", help="I/N: build only the I-th of N contiguous slices of the shards")
    parser.add_argument("--index-only", action="store_true", help="only write DIR/index.json from finished shards")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, manifests: list[Manifest]) -> BuildConfig:
    captions = _parse_captions(args.captions)
    meta_columns = _parse_meta_columns(args.meta_columns)
    clash = [c for c in meta_columns if c in captions or c in RESERVED_FIELDS]
    if clash:
        raise ValueError(f"--meta-columns: {', '.join(clash)} clash with caption fields or width/height")
    return BuildConfig.create(str(args.out), manifests, image_column=args.image_column, captions=captions,
                              key_column=args.key_column, meta_columns=meta_columns,
                              samples_per_shard=args.samples_per_shard, max_size=args.max_size, quality=args.quality,
                              prefix=args.prefix, image_root=args.image_root)


def _check_args(args: argparse.Namespace) -> None:
    if args.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    if not 1 <= args.quality <= 100:
        raise ValueError("--quality must be 1..100")
    if args.max_size < 0:
        raise ValueError("--max-size must be >= 0 (0 keeps the original size)")
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if not args.prefix or "/" in args.prefix or "." in args.prefix:
        raise ValueError("--prefix: a non-empty name without '/' or '.'")
    if not args.manifests and not args.index_only:
        raise ValueError("name at least one manifest (only --index-only works without)")


def _finish_index(out: Path, jobs: list[ShardJob], settings: dict | None) -> tuple[str, int, bool]:
    """Write the index when the full range is complete: (summary phrase, exit status, whether it was complete)."""
    index, missing = assemble_index(out, jobs, settings)
    if index is None:
        return f"index: not yet, {len(missing)} shard(s) unfinished (first {missing[0]})", 0, False
    if not index.shards:
        return "index: not written, no shard holds a usable sample", 1, True
    write_index(out / INDEX_NAME, index)
    empty = len(index.extra["empty_shards"])
    left_out = f", {empty} empty shard(s) left out" if empty else ""
    return f"index: {out / INDEX_NAME} ({len(index.shards)} shards, {index.samples} samples{left_out})", 0, True


def _index_only(args: argparse.Namespace, out: Path) -> int:
    if args.manifests:
        settings = make_config(args, plan_manifests(_expand(args.manifests), args.samples_per_shard, [], [])).settings
    else:
        found = sorted(out.glob(f"{args.prefix}-*.stats.json")) if out.is_dir() else []
        stats = next((s for s in (read_stats(out, p.name.replace(".stats.json", ".tar")) for p in found) if s), None)
        if stats is None:
            print(f"build_shards: {out}: no {args.prefix}-*.stats.json of a finished shard here", file=sys.stderr)
            return 1
        settings = stats["settings"]
    phrase, status, complete = _finish_index(out, jobs_from_settings(settings), settings)
    if not complete and (out / INDEX_NAME).exists():
        # "an index exists" means "the set is complete" to its readers (the config check looks at the ends only)
        (out / INDEX_NAME).unlink()
        phrase += f"; removed the stale {out / INDEX_NAME}"
    print(f"build_shards: {phrase}", file=sys.stderr)
    return status if complete else 1


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    if args.index_only:
        return _index_only(args, out)
    part, parts = parse_part(args.part)
    columns = read_columns(args.image_column, _parse_captions(args.captions), _parse_meta_columns(args.meta_columns),
                           args.key_column)
    manifests = plan_manifests(_expand(args.manifests), args.samples_per_shard, columns, [args.image_column])
    cfg = make_config(args, manifests)
    if not sum(m.rows for m in manifests):
        raise ManifestError(f"{', '.join(m.path for m in manifests)}: no rows")
    jobs = shard_jobs(manifests, args.samples_per_shard, args.prefix)
    mine = part_slice(jobs, args.part)
    out.mkdir(parents=True, exist_ok=True)

    names = {job.name for job in mine} | {stats_name(job.name) for job in mine}
    entries = {entry.name for entry in os.scandir(out)}
    stale = [name for name in entries if temp_owner(name) in names]
    for name in stale:
        (out / name).unlink(missing_ok=True)
    kept, todo = [], []
    for job in mine:
        stats = read_stats(out, job.name) if job.name in entries else None
        if stats is not None:
            check_settings(stats, cfg.settings, out / stats_name(job.name))
            kept.append(stats)
        else:
            todo.append(job)
    workers = min(args.workers or _default_workers(), max(1, len(todo)))
    print(f"build_shards: part {part}/{parts}: shards {len(mine)} of {len(jobs)} ({sum(m.rows for m in manifests)} "
          f"rows in {len(manifests)} manifest(s)); {len(kept)} finished and kept, {len(stale)} stale temporary "
          f"file(s) removed, {len(todo)} to build with {workers} worker(s)", file=sys.stderr)
    if todo:
        (out / INDEX_NAME).unlink(missing_ok=True)  # the set is incomplete while shards are being (re)built
    built, failed = _build_all(todo, cfg, workers)
    phrase, status, _ = _finish_index(out, jobs, cfg.settings) if not failed else ("index: not written", 0, False)
    everything = built + kept
    samples = sum(s["samples"] for s in everything)
    skipped: dict[str, int] = {}
    for stats in everything:
        for reason, count in stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    print(f"build_shards: part {part}/{parts} done: {len(built)} shards built, {len(kept)} kept, {samples} samples, "
          f"skipped {dict(sorted(skipped.items()))}, {time.perf_counter() - started:.1f} s; {phrase}", file=sys.stderr)
    if failed:
        for name, error in failed:
            print(f"build_shards: {name} failed: {error}", file=sys.stderr)
        return 1
    return status


def _build_all(todo: list[ShardJob], cfg: BuildConfig, workers: int) -> tuple[list[dict], list[tuple[str, str]]]:
    from tqdm import tqdm

    built: list[dict] = []
    failed: list[tuple[str, str]] = []
    if not todo:
        return built, failed
    start = time.perf_counter()
    samples = 0
    with tqdm(total=len(todo), unit="shard", file=sys.stderr, desc="build_shards",
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        def absorb(result: tuple[str, dict | None, str | None]) -> None:
            nonlocal samples
            name, stats, error = result
            if stats is None:
                failed.append((name, str(error)))
            else:
                built.append(stats)
                samples += stats["samples"]
            bar.update(1)
            bar.set_postfix(samples=samples, rate=f"{samples / max(time.perf_counter() - start, 1e-9):.0f}/s",
                            refresh=False)

        if workers == 1:
            for job in todo:
                absorb(build_in_worker(job, cfg))
                if failed:
                    break
        else:
            # spawn, not fork: the parent has touched pyarrow (threads, allocator) while planning. The worker
            # functions live in the package, so spawned processes import them by name, whoever loaded this script.
            with multiprocessing.get_context("spawn").Pool(workers, init_worker, (cfg,)) as pool:
                for result in pool.imap_unordered(build_in_worker, todo):
                    absorb(result)
                    if failed:
                        pool.terminate()
                        break
    return built, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _check_args(args)
        return run(args)
    except (ManifestError, SettingsMismatch, ValueError) as err:
        print(f"build_shards: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
