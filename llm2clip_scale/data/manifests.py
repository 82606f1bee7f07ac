"""Image–caption manifests: planning which rows go to which shard, and reading one shard's rows back.

A manifest is a table with one row per image (:mod:`llm2clip_scale.data.shard_build` turns the rows into samples):

- ``.parquet`` (also ``.pq``): any columns; images as paths, encoded bytes or ``{bytes, path}`` structs. Planning
  reads only the footer (row count, rows per row group); a shard reads only the row groups that cover its rows, in
  batches of ``_PARQUET_BATCH`` rows. The rows of a row group that cannot be read are rows that cannot be parsed.
- ``.jsonl`` (also ``.ndjson``): one json object per non-blank line. A line that is not a json object is a row that
  cannot be parsed (``None``, counted ``bad_row`` by the builder), so it still takes its row number.
- ``.csv``: a header row, then one record per row (quoted cells may span lines). A record with the wrong number of
  cells, or one the csv module rejects, is a row that cannot be parsed. Blank lines (jsonl and csv) are not rows; a
  UTF-8 byte order mark is not part of the first row.

The row→shard rule is deterministic and global: the manifests' rows, concatenated in the order given, are numbered
``0, 1, ...``, and row ``i`` goes to shard ``i // S`` (``S`` rows per shard; the last shard may be shorter). A shard
is a :class:`ShardJob` holding :class:`Segment` s (a row range of one manifest, plus the byte offset where a
jsonl/csv segment starts), so each process finds its rows without reading the other shards': planning scans a
jsonl/csv file once and keeps the offsets of the rows that begin a shard only. The same files in the same order give
the same plan in every process, part and restart.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_KINDS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_PARQUET_BATCH = 256  # rows decoded at a time from a parquet row group


class ManifestError(Exception):
    """A manifest that cannot be used at all (missing, unreadable, lacking a column): exit status 2."""


# ---------------------------------------------------------------------------------------------------------- planning


@dataclass
class Manifest:
    path: str
    kind: str  # parquet | jsonl | csv
    rows: int = 0
    start: int = 0  # global row number of its first row
    row_groups: list[int] = field(default_factory=list)  # parquet: rows per row group
    header: list[str] = field(default_factory=list)  # csv: column names
    offsets: dict[int, int] = field(default_factory=dict)  # jsonl/csv: local row -> byte offset of its line/record


@dataclass(frozen=True)
class Segment:
    manifest: int  # index into the plan's manifests
    first: int  # local rows [first, last) of that manifest
    last: int
    offset: int  # jsonl/csv: byte offset of row `first`


@dataclass(frozen=True)
class ShardJob:
    index: int
    name: str  # {prefix}-NNNNNN.tar
    first_row: int  # global rows [first_row, last_row)
    last_row: int
    segments: tuple[Segment, ...]


def _csv_lines(handle, position: list[int]) -> Iterator[str]:
    """Decoded lines of a binary file; ``position[0]`` is the byte offset after the last line handed out."""
    for raw in handle:
        position[0] += len(raw)
        yield raw.decode("utf-8", "replace")


def _csv_records(handle, start: int) -> Iterator[tuple[list[str] | None, int]]:
    """(cells or None for an unparsable record, byte offset after it) from ``start``; blank lines are not records.

    The csv reader pulls exactly the lines of one record per step, so the offset after a record is where a fresh
    reader started there continues identically: the scan and the shard builders agree on every row number.
    """
    handle.seek(start)
    position = [start]
    reader = csv.reader(_csv_lines(handle, position))
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield None, position[0]
            continue
        if cells:
            yield cells, position[0]


def _jsonl_lines(handle, start: int) -> Iterator[tuple[bytes, int]]:
    """(line, byte offset after it) of the non-blank lines from ``start``; blank lines are not rows."""
    handle.seek(start)
    position = start
    for line in handle:
        position += len(line)
        if line.strip():
            yield line, position


def _marks(start: int, rows_per_shard: int) -> Iterator[int]:
    """Local row numbers of a manifest starting at global row ``start`` where a shard begins."""
    local = (-start) % rows_per_shard
    while True:
        yield local
        local += rows_per_shard


def _scan_lines(manifest: Manifest, rows_per_shard: int) -> None:
    """Count a jsonl/csv manifest's rows and record the byte offset of every row that begins a shard."""
    with open(manifest.path, "rb") as handle:
        data_start = 0
        if handle.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte order mark is not part of the first row
            data_start = 3
        if manifest.kind == "csv":
            header = next(_csv_records(handle, data_start), None)
            if header is None or header[0] is None:
                raise ManifestError(f"{manifest.path}: no csv header row")
            manifest.header = [name.strip() for name in header[0]]
            data_start = header[1]
            records = (end for _, end in _csv_records(handle, data_start))
        else:
            records = (end for _, end in _jsonl_lines(handle, data_start))
        manifest.offsets[0] = data_start  # a segment starts at row 0 or at a shard boundary
        marks = _marks(manifest.start, rows_per_shard)
        mark = next(marks)
        rows, offset = 0, data_start
        for end in records:
            if rows == mark:
                manifest.offsets[rows] = offset
                mark = next(marks)
            rows += 1
            offset = end
        manifest.rows = rows


def _read_jsonl_head(manifest: Manifest) -> dict | None:
    """The first parseable jsonl object (to warn early about a misspelt column), or None."""
    with open(manifest.path, "rb") as handle:
        for line, _ in _jsonl_lines(handle, 0):
            try:
                row = json.loads(line.lstrip(b"\xef\xbb\xbf"))
            except ValueError:
                continue
            return row if isinstance(row, dict) else None
    return None


def plan_manifests(paths: Sequence[str], rows_per_shard: int, columns: Sequence[str],
                   required: Sequence[str]) -> list[Manifest]:
    """Open every manifest (metadata only for parquet, one scan for jsonl/csv) and number the rows globally.

    ``columns`` must exist in parquet/csv manifests (ManifestError otherwise); for jsonl a ``required`` column that
    the first object lacks is warned about.
    """
    manifests: list[Manifest] = []
    start = 0
    for path in paths:
        kind = MANIFEST_KINDS.get(Path(path).suffix.lower())
        if kind is None:
            raise ManifestError(f"{path}: unknown manifest type; use .parquet, .jsonl or .csv")
        manifest = Manifest(path=path, kind=kind, start=start)
        if not Path(path).is_file():
            raise ManifestError(f"{path}: no such manifest file")
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(path)
                meta = parquet.metadata
                manifest.rows = meta.num_rows
                manifest.row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                names = parquet.schema_arrow.names
            else:
                _scan_lines(manifest, rows_per_shard)
                names = manifest.header
        except ManifestError:
            raise
        except Exception as err:  # noqa: BLE001 - pyarrow and the file system raise many kinds
            raise ManifestError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
        if kind == "jsonl":
            head = _read_jsonl_head(manifest)
            lacking = [c for c in required if head is not None and c not in head]
            if lacking:
                print(f"build_shards: warning: {path}: the first row has no {', '.join(lacking)} column(s)",
                      file=sys.stderr)
        else:
            missing = [c for c in columns if c not in names]
            if missing:
                raise ManifestError(f"{path}: no column(s) {', '.join(missing)} (has: {', '.join(names)})")
        manifests.append(manifest)
        start += manifest.rows
    return manifests


def shard_name(prefix: str, index: int, count: int) -> str:
    """``{prefix}-NNNNNN.tar``: 6 digits, more when there are over a million shards."""
    return f"{prefix}-{index:0{max(6, len(str(count - 1)))}d}.tar"


def shard_jobs(manifests: Sequence[Manifest], rows_per_shard: int, prefix: str) -> list[ShardJob]:
    """Every shard of the plan: global rows ``[i * S, (i + 1) * S)`` as segments of the manifests that hold them."""
    total = sum(m.rows for m in manifests)
    count = -(-total // rows_per_shard)
    jobs = []
    number = 0  # the first manifest that may hold rows of the current shard (thousands of manifests: no rescans)
    for index in range(count):
        first, last = index * rows_per_shard, min(total, (index + 1) * rows_per_shard)
        segments = []
        while manifests[number].start + manifests[number].rows <= first:
            number += 1
        for later in range(number, len(manifests)):
            manifest = manifests[later]
            if manifest.start >= last:
                break
            lo, hi = max(first, manifest.start), min(last, manifest.start + manifest.rows)
            if lo < hi:
                local = lo - manifest.start
                segments.append(Segment(later, local, hi - manifest.start, manifest.offsets.get(local, 0)))
        jobs.append(ShardJob(index, shard_name(prefix, index, count), first, last, tuple(segments)))
    return jobs


# ----------------------------------------------------------------------------------------------------- row reading


def _parquet_rows(manifest: Manifest, segment: Segment, columns: list[str]) -> Iterator[dict | None]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(manifest.path)
    group_start = 0
    for group, size in enumerate(manifest.row_groups):
        lo, hi = max(segment.first, group_start), min(segment.last, group_start + size)
        if lo < hi:
            done = lo  # rows handed out so far end here
            try:
                # Batches, not the whole row group: a group of 100k embedded images would not fit in memory.
                position = group_start
                for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=columns,
                                                  use_threads=False):
                    begin, position = position, position + batch.num_rows
                    if position <= lo:
                        continue
                    data = batch.slice(max(lo, begin) - begin, min(hi, position) - max(lo, begin)).to_pydict()
                    for i in range(min(hi, position) - max(lo, begin)):
                        done += 1
                        yield {name: values[i] for name, values in data.items()}
                    if position >= hi:
                        break
            except Exception:  # noqa: BLE001 - a damaged row group costs its remaining rows, not the build
                pass
            yield from (None for _ in range(hi - done))  # rows a damaged (or short) group did not deliver
        group_start += size


def _jsonl_rows(manifest: Manifest, segment: Segment) -> Iterator[dict | None]:
    with open(manifest.path, "rb") as handle:
        lines = _jsonl_lines(handle, segment.offset)
        for _ in range(segment.last - segment.first):
            line, _end = next(lines, (None, 0))
            if line is None:
                return  # the file shrank since the scan; the shard builder reports the short count
            try:
                row = json.loads(line)
            except ValueError:  # includes UnicodeDecodeError
                row = None
            yield row if isinstance(row, dict) else None


def _csv_rows(manifest: Manifest, segment: Segment) -> Iterator[dict | None]:
    width = len(manifest.header)
    with open(manifest.path, "rb") as handle:
        records = _csv_records(handle, segment.offset)
        for _ in range(segment.last - segment.first):
            cells, end = next(records, (None, -1))
            if end < 0:
                return  # the file shrank since the scan; the shard builder reports the short count
            yield dict(zip(manifest.header, cells)) if cells is not None and len(cells) == width else None


def manifest_rows(manifest: Manifest, segment: Segment, columns: Sequence[str]) -> Iterator[dict | None]:
    """The rows of one segment in order: a dict per row, None for a row that cannot be parsed (``bad_row``).

    ``columns``: the ones a parquet manifest decodes (the others are never read); jsonl/csv rows hold all theirs.
    """
    if manifest.kind == "parquet":
        yield from _parquet_rows(manifest, segment, list(dict.fromkeys(columns)))
    elif manifest.kind == "jsonl":
        yield from _jsonl_rows(manifest, segment)
    else:
        yield from _csv_rows(manifest, segment)
