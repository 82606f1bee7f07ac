"""Check webdataset image shards (and their embedding sidecars) before a long run: what would the loaders skip?

    python data_prep/validate_shards.py SHARDS [--embeddings SIDECARS] [--fields raw,short,long] [--embedding-dim D]
        [--workers N] [--global-keys] [--strict] [--json REPORT.json]

SHARDS is a brace/glob pattern (``::`` joins several) or a dataset index (``index.json``, :mod:`llm2clip_scale.data.
index`), whose per-shard sample counts and sizes are then checked too. SIDECARS is a pattern with one sidecar per
image shard in the same order (as the loaders pair them), or a directory holding ``<image shard file name>`` for each
(:func:`llm2clip_scale.data.sidecar.sidecar_path`).

Every shard is read the way the loaders read it (:func:`llm2clip_scale.data.shards.read_shard`, every image decoded
in full, sidecar vectors decoded by :class:`llm2clip_scale.data.sidecar.EmbeddingDecoder`) and findings are counted
per shard and reason (:data:`REASONS`). Shards go to a pool of processes, one whole shard each: a worker holds one
sample and the keys of one shard at a time, never a whole shard.

Exit status: 0 no findings (or findings without --strict), 1 findings with --strict, 2 usage errors (a pattern that
matches no existing file, an unreadable index, sidecar and image shard counts that differ, bad options).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.data.index import DatasetIndexError, is_index, read_index
from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, read_shard
from llm2clip_scale.data.sidecar import (
    EMBEDDINGS_KEY,
    SIDECAR_FORMAT,
    SIDECAR_URL_KEY,
    EmbeddingDecoder,
    read_header,
    sidecar_path,
)

# The loader's image members, in its order of preference (llm2clip_scale/data/samples.py; not imported from there:
# that module pulls in transformers and torchvision, 3-4 s per start; tests/test_validate_shards.py checks they agree).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

# Every reason, in report order, with what one count means. ``missing_caption:<field>`` (one per --fields entry)
# follows ``missing_caption``.
REASONS: dict[str, str] = {
    # image shard, one count per shard
    "read_error": "the shard cannot be opened (missing, unreadable)",
    "truncated": "the tar is damaged (cut short, corrupt); samples before the damage are checked",
    "sample_count_mismatch": "an undamaged shard holds another number of samples than the index says",
    "size_mismatch": "the shard's size in bytes differs from the index's",
    # image samples, one count per sample
    "duplicate_key": "a key seen before in the same shard",
    "duplicate_key_global": "(--global-keys) a key that an earlier shard holds too",
    "missing_image": "no jpg/jpeg/png/webp member",
    "empty_image": "a 0-byte image member",
    "bad_image": "image bytes PIL cannot decode in full",
    "bad_json": "a json member that is not a json object",
    "missing_caption": "no json member, or (without --fields) no non-blank string in it",
    # sidecar, one count per sidecar shard
    "sidecar_read_error": "the sidecar cannot be opened or read to its end",
    "bad_sidecar_header": "no readable __sidecar__ header of a known format",
    "sidecar_mismatch": "the header names another image shard",
    "sidecar_dim_mismatch": "the header's embedding_dim differs from --embedding-dim",
    # sidecar records and the samples they belong to
    "missing_embedding": "an image sample without a record, or without a vector for a caption field its json holds",
    "orphan_embedding": "a sidecar record for a key the image shard lacks",
    "sidecar_order": "records out of the image shard's order (the fewest that must move to restore it)",
    "duplicate_embedding": "a second record for the same key",
    "wrong_embedding_dim": "a record with a vector of another width than --embedding-dim or the header's",
    "bad_embedding": "a record with a vector that does not decode or is not finite",
    # the validator itself
    "check_error": "the check of this shard failed unexpectedly (the message is in the json report)",
}
SHARD_LEVEL = frozenset({"read_error", "truncated", "sample_count_mismatch", "size_mismatch", "sidecar_read_error",
                         "bad_sidecar_header", "sidecar_mismatch", "sidecar_dim_mismatch", "check_error"})
EXAMPLES_PER_REASON = 3  # keys (or messages) kept per shard and reason for the json report
REPORT_FORMAT = "llm2clip-scale/validate-shards/1"


# ----------------------------------------------------------------------------------------------------- one shard


@dataclass(frozen=True)
class ShardTask:
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


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _open_error(url: str) -> str | None:
    """Why a local file cannot be opened, or None (remote urls are left to the reader)."""
    if not _is_local(url):
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


def _check(task: ShardTask, findings: _Findings, details: dict, hashes: list[int]) -> int:
    error = _open_error(task.url)
    if error is not None:
        findings.add("read_error", error)
        details["read"], details["lost"] = 0, task.expected_samples  # None: unknown without an index
        return 0
    if task.expected_bytes and _is_local(task.url):
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
    if not any(not _is_local(url) or os.path.exists(url) for url, _, _ in entries):
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
            # fork: workers inherit the imports (torch and webdataset take seconds) and the script's module, which
            # tests load from a file path that spawn could not import by name. Forked before the progress bar
            # exists, so no thread of it is copied.
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(workers, len(tasks))))
            results = pool.imap_unordered(_indexed_check, tasks, chunksize=1)
        bar = stack.enter_context(tqdm(total=len(tasks), unit="shard", file=sys.stderr, disable=not progress,
                                       dynamic_ncols=True, mininterval=0.2 if sys.stderr.isatty() else 5.0))
        samples = 0
        for i, report in results:
            reports[i] = report
            samples += report["samples"]
            bar.update(1)
            bar.set_postfix(samples=samples, refresh=False)
    return reports  # type: ignore[return-value]


def _indexed_check(task: ShardTask) -> tuple[int, dict]:
    return task.index, check_shard(task)


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
