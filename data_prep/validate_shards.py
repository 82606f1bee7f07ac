"""Check webdataset image shards (and their embedding sidecars) before a long run: what would the loaders skip?

    python data_prep/validate_shards.py SHARDS [--embeddings SIDECARS] [--fields raw,short,long] [--embedding-dim D]
        [--workers N] [--global-keys] [--strict] [--json REPORT.json]

SHARDS is a brace/glob pattern (``::`` joins several) or a dataset index (``index.json``, :mod:`llm2clip_scale.data.
index`), whose per-shard sample counts and sizes are then checked too. SIDECARS is a pattern with one sidecar per
image shard in the same order (as the loaders pair them), or a directory holding ``<image shard file name>`` for each
(:func:`llm2clip_scale.data.sidecar.sidecar_path`).

The command line only: how a shard is read and checked, and what each reason counts, are
:mod:`llm2clip_scale.data.shard_check`. Shards go to a pool of processes, one whole shard each; this process keeps
their reports (with --global-keys also 8 bytes per sample), prints a row per shard with findings, a row per reason
and the verdict, and writes the full report with --json.

Exit status: 0 no findings (or findings without --strict), 1 findings with --strict, 2 usage errors (a pattern that
matches no existing file, an unreadable index, sidecar and image shard counts that differ, bad options).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.data.index import DatasetIndexError, is_index, read_index
from llm2clip_scale.data.shard_check import (
    REASONS,
    ShardTask,
    check_shard,
    find_global_duplicates,
    indexed_check,
    is_local,
)
from llm2clip_scale.data.sidecar import sidecar_path

REPORT_FORMAT = "llm2clip-scale/validate-shards/1"


# ------------------------------------------------------------------------------------------------ whole data set


class UsageError(ValueError):
    pass


def shard_tasks(shards: str, embeddings: str | None, fields: tuple[str, ...] | None, embedding_dim: int | None,
                global_keys: bool) -> list[ShardTask]:
    entries: list[tuple[str, int | None, int | None]] = []
    for part in shards.split("::"):
        if is_index(part):
            try:
                index = read_index(part)
            except DatasetIndexError as err:
                raise UsageError(str(err)) from None
            urls = index.urls(Path(part).parent)
            entries.extend((url, s.samples, s.bytes) for url, s in zip(urls, index.shards))
        else:
            entries.extend((url, None, None) for url in expand_shards(part))
    if not entries:
        raise UsageError(f"{shards!r} matches no shards")
    if not any(not is_local(url) or os.path.exists(url) for url, _, _ in entries):
        raise UsageError(f"none of the {len(entries)} shard(s) of {shards!r} exists (first {entries[0][0]})")
    urls = [url for url, _, _ in entries]
    sidecars: list[str | None] = [None] * len(urls)
    if embeddings is not None:
        if os.path.isdir(embeddings):
            sidecars = [str(sidecar_path(url, embeddings)) for url in urls]
        else:
            matched = expand_shards(embeddings)
            if not matched:
                raise UsageError(f"--embeddings: {embeddings!r} matches no sidecar shards")
            if len(matched) != len(urls):
                raise UsageError(f"--embeddings: {len(matched)} sidecar shards for {len(urls)} image shards; give one "
                                 "sidecar per image shard, in the same order (or the sidecar directory)")
            sidecars = list(matched)
    return [ShardTask(i, url, sidecar, expected, size, fields, embedding_dim, global_keys)
            for i, ((url, expected, size), sidecar) in enumerate(zip(entries, sidecars))]


def run_checks(tasks: Sequence[ShardTask], workers: int, progress: bool = True) -> list[dict]:
    """Reports in shard order; ``workers`` > 1 checks shards in a pool of forked processes."""
    reports: list[dict | None] = [None] * len(tasks)
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(tasks) <= 1:
            results: Iterable[tuple[int, dict]] = ((task.index, check_shard(task)) for task in tasks)
        else:
            # fork, though the worker (shard_check.indexed_check) is importable by name: spawned or forkserver
            # workers import torch and webdataset again, 3-4 s idle, 7-15 s measured on a busy 2-core machine, per
            # pool, where fork costs nothing. Nothing here forks badly: no CUDA, no pyarrow, and the pool exists
            # before the progress bar's thread does.
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(tasks))))
            results = pool.imap_unordered(indexed_check, tasks, chunksize=1)
        bar = stack.enter_context(tqdm(total=len(tasks), unit="shard", file=sys.stderr, disable=not progress,
                                       dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 5.0))
        samples = 0
        for i, report in results:
            reports[i] = report
            samples += report["samples"]
            bar.update(1)
            bar.set_postfix(samples=samples, refresh=False)
    return reports  # type: ignore[return-value]


def reason_order(fields: Sequence[str] | None) -> list[str]:
    order = list(REASONS)
    at = order.index("missing_caption") + 1
    order[at:at] = [f"missing_caption:{name}" for name in fields or ()]
    return order


def summarize(reports: list[dict], fields: Sequence[str] | None) -> dict:
    totals: dict[str, int] = {}
    for report in reports:
        for reason, count in report["findings"].items():
            totals[reason] = totals.get(reason, 0) + count
    order = reason_order(fields)
    totals = dict(sorted(totals.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    damaged = [r for r in reports if "truncated" in r["findings"] or "read_error" in r["findings"]]
    expected = [r["expected"] for r in reports]
    return {
        "shards": len(reports),
        "shards_with_findings": sum(1 for r in reports if r["findings"]),
        "samples": sum(r["samples"] for r in reports),
        "expected_samples": sum(expected) if all(e is not None for e in expected) else None,
        "lost_samples": sum(r["details"].get("lost") or 0 for r in damaged),
        "damaged_shards_loss_unknown": sum(1 for r in damaged if r["details"].get("lost") is None),
        "findings": totals,
        "ok": not totals,
    }


def _display_names(urls: Sequence[str]) -> list[str]:
    """Shard paths relative to their common folder (file names, usually)."""
    folders = {os.path.dirname(url) for url in urls}
    if len(folders) == 1:
        return [os.path.basename(url) for url in urls]
    try:
        root = os.path.commonpath(list(folders))
    except ValueError:
        return list(urls)
    return [os.path.relpath(url, root) if root else url for url in urls]


def _loss_note(report: dict) -> str:
    if "truncated" not in report["findings"] and "read_error" not in report["findings"]:
        return ""
    lost = report["details"].get("lost")
    lost_text = "loss unknown: no index" if lost is None else f"{lost} lost"
    if "read_error" in report["findings"]:
        return f" ({lost_text})"
    return f" ({report['samples']} read before the damage, {lost_text})"


def format_report(reports: list[dict], summary: dict, max_rows: int) -> str:
    """A row per shard with findings (its counts by reason), a row per reason over all shards, the verdict."""
    flagged = [r for r in reports if r["findings"]]
    lines: list[str] = []
    if flagged:
        order = list(summary["findings"])
        has_index = any(r["expected"] is not None for r in reports)
        names = dict(zip((r["shard"] for r in reports), _display_names([r["shard"] for r in reports])))
        shown = flagged if max_rows <= 0 else flagged[:max_rows]
        rows = [["shard", "samples", *(["expected"] if has_index else []), "findings"]]
        for r in shown:
            counts = " ".join(f"{reason}={r['findings'][reason]}" for reason in order if reason in r["findings"])
            expected = [] if not has_index else ["-" if r["expected"] is None else str(r["expected"])]
            rows.append([names[r["shard"]], str(r["samples"]), *expected, counts + _loss_note(r)])
        total_expected = summary["expected_samples"]
        rows.append(["total", str(summary["samples"]),
                     *([] if not has_index else ["-" if total_expected is None else str(total_expected)]),
                     f"{sum(summary['findings'].values())} findings in {len(flagged)} shard(s)"])
        lines.extend(_align(rows, numeric=range(1, len(rows[0]) - 1)))
        if len(shown) < len(flagged):
            lines.insert(-1, f"... {len(flagged) - len(shown)} more shard(s) with findings (--max-rows 0, or --json)")
        lines.append("")
        rows = [["reason", "count", "shards", "meaning"]]
        for reason, count in summary["findings"].items():
            field = reason.partition(":")[2]
            meaning = f"no non-blank {field!r} caption" if field else REASONS.get(reason, "")
            shards = sum(1 for r in flagged if reason in r["findings"])
            rows.append([reason, str(count), str(shards), meaning])
        lines.extend(_align(rows, numeric=(1, 2)))
    lines.append(verdict(summary))
    return "\n".join(lines)


def _align(rows: list[list[str]], numeric: Iterable[int]) -> list[str]:
    right = set(numeric)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    last = len(widths) - 1
    return ["  ".join(cell if i == last else cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def verdict(summary: dict) -> str:
    expected = summary["expected_samples"]
    read = f"{summary['samples']} samples" + (f" of {expected} indexed" if expected is not None else "")
    if summary["ok"]:
        return f"OK: {summary['shards']} shards, {read}, no findings"
    total = sum(summary["findings"].values())
    line = f"FINDINGS: {summary['shards_with_findings']} of {summary['shards']} shards, {total} findings; {read}"
    if summary["lost_samples"]:
        line += f"; {summary['lost_samples']} samples lost to damage"
    if summary["damaged_shards_loss_unknown"]:
        line += f"; loss unknown in {summary['damaged_shards_loss_unknown']} damaged shard(s) without an index"
    return line


# --------------------------------------------------------------------------------------------------------------- CLI


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="reasons:\n" + "\n".join(f"  {name:22s} {text}" for name, text in REASONS.items())
        + f"\n  {'missing_caption:F':22s} (--fields) no non-blank caption F")
    parser.add_argument("shards", metavar="SHARDS", help="brace/glob pattern of image shards, or an index.json")
    parser.add_argument("--embeddings", metavar="SIDECARS",
                        help="sidecar pattern (one per image shard, same order) or the sidecar directory")
    parser.add_argument("--fields", help="comma-separated caption fields every sample must hold (non-blank); "
                        "default: at least one non-blank string in the json")
    parser.add_argument("--embedding-dim", type=int, metavar="D",
                        help="required vector width (the adapter's input size); default: each sidecar header's")
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help="processes checking shards (default: min(CPUs, 8))")
    parser.add_argument("--global-keys", action="store_true",
                        help="also find keys repeated across shards (8 bytes per sample in the main process)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when anything is found")
    parser.add_argument("--json", metavar="REPORT", help="write the full per-shard report here")
    parser.add_argument("--max-rows", type=int, default=50, help="shards listed in the table (0: all; default 50)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse: 0 after --help, 2 on a usage error
        return int(stop.code or 0)
    try:
        fields = None
        if args.fields is not None:
            fields = tuple(name.strip() for name in args.fields.split(","))
            if not all(fields) or len(set(fields)) != len(fields):
                raise UsageError(f"--fields {args.fields!r}: give distinct non-empty names, e.g. raw,short")
        if args.embedding_dim is not None and args.embedding_dim < 1:
            raise UsageError(f"--embedding-dim {args.embedding_dim}: must be >= 1")
        if args.workers < 1:
            raise UsageError(f"--workers {args.workers}: must be >= 1")
        tasks = shard_tasks(args.shards, args.embeddings, fields, args.embedding_dim, args.global_keys)
    except UsageError as err:
        print(f"validate_shards: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    reports = run_checks(tasks, args.workers, progress=not args.no_progress)
    if args.global_keys:
        find_global_duplicates(reports)
    elapsed = time.perf_counter() - started
    summary = summarize(reports, fields)
    print(format_report(reports, summary, args.max_rows))
    print(f"checked in {elapsed:.1f} s ({len(reports) / elapsed:.2f} shards/s, {summary['samples'] / elapsed:.0f} "
          f"samples/s, {args.workers} worker(s))", file=sys.stderr)
    if args.json:
        document = {"format": REPORT_FORMAT, "shards_source": args.shards, "embeddings": args.embeddings,
                    "options": {"fields": list(fields) if fields else None, "embedding_dim": args.embedding_dim,
                                "global_keys": args.global_keys},
                    "seconds": round(elapsed, 3), "summary": summary, "verdict": verdict(summary),
                    "reasons": REASONS, "shards": reports}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 1 if args.strict and not summary["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
