"""Stage-1 pair files: caption pairs from ``.jsonl``/``.csv`` files, read line by line, whole or by byte range.

Format: a ``.jsonl`` line is an object with string ``query``, ``positive`` and optionally ``negative`` and
``instruction``; a ``.csv`` file starts with a header row naming those columns, then one row per pair (an empty
``negative`` or ``instruction`` cell, like an absent jsonl key, means none is given). A row's ``instruction`` is the
query's instruction for that row, used verbatim (end it with the separator the caption should follow, e.g. ": "),
in place of the one ``model.llm.instruction`` or the pair's direction would choose: LLM2Vec's mixes give each
dataset its own task instruction. Blank lines are not rows. A pair's ``group`` is ``<path>@<byte offset of its
line>``.

Byte-range split (:func:`read_pair_range`): part ``p`` of ``P`` takes the lines that *start* in bytes
``[p*S//P, (p+1)*S//P)`` of the ``S``-byte file; it seeks there, drops the partial line and reads on past its end
to finish its last line. A csv header is read from the file start by every part. Reading the whole file
(:func:`read_pair_file`, as CRA evaluation does) is part 0 of 1, so training and evaluation share this one parser
and a line's pair (and group) is the same whatever the split.

Lines are parsed one at a time, so csv rows with a newline inside a quoted cell are not supported: a line with an
odd number of ``"`` (where such a cell opens or closes, or a stray quote) is skipped as ``quoted_newline``; the
middle lines of a cell spanning three or more lines cannot be told from rows and are read as rows (usually
``bad_row``).

Counted skips (:class:`~llm2clip_scale.data.shards.SkipCounter`): ``read_error`` (file unreadable, csv header
without query/positive columns), ``bad_json`` (jsonl line that is not UTF-8 or does not parse to an object),
``bad_row`` (csv line that is not UTF-8 or has the wrong number of cells), ``missing_caption`` (an empty or
non-string query/positive/negative), ``bad_instruction`` (a jsonl ``instruction`` that is not a string),
``quoted_newline``. Problems of the file as a whole are counted by part 0
only and a line's by the part it starts in, so counts sum over the parts to those of reading the whole file.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm2clip_scale.data.shards import SkipCounter

PAIR_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")


@dataclass(frozen=True)
class CaptionPair:
    """One stage-1 pair; defined here (and re-exported by :mod:`llm2clip_scale.data.pairs`) as the record that
    pair files and shards both produce."""

    query: str
    positive: str
    negative: str | None = None
    group: str = ""  # the image (sample key) or file line the captions describe; negatives come from another group
    query_field: str | None = None
    positive_field: str | None = None
    instruction: str | None = None  # the query's own instruction (pair files); None = the collator chooses


class _Uncounted(SkipCounter):
    """A skip counter that counts nothing: for the skips another rank counts (data every rank reads)."""

    def __init__(self) -> None:
        super().__init__("uncounted")

    def add(self, reason: str, where: str, error: object = None) -> None:
        pass

    def good(self) -> None:
        pass


UNCOUNTED: SkipCounter = _Uncounted()


def byte_range(size: int, part: int, parts: int) -> tuple[int, int]:
    """Bytes ``[start, end)`` of part ``part`` of ``parts`` of a ``size``-byte file; lines starting there are its."""
    return part * size // parts, (part + 1) * size // parts


def read_pair_file(path: str | Path, skips: SkipCounter) -> Iterator[CaptionPair]:
    """Pairs of one whole ``.jsonl``/``.csv`` file: :func:`read_pair_range` part 0 of 1."""
    return read_pair_range(path, skips)


def read_pair_range(path: str | Path, skips: SkipCounter, part: int = 0, parts: int = 1) -> Iterator[CaptionPair]:
    """Pairs of the lines of one ``.jsonl``/``.csv`` file that start in byte range ``part`` of ``parts``
    (:func:`byte_range`), in file order; ``parts=1`` reads the whole file (module doc: format, what is counted)."""
    name, suffix = str(path), Path(path).suffix
    if suffix not in PAIR_FILE_SUFFIXES:
        raise ValueError(f"{name}: pair files must end in {' or '.join(PAIR_FILE_SUFFIXES)}")
    if not 0 <= part < parts:
        raise ValueError(f"{name}: part {part} must lie in [0, parts={parts})")
    whole_file_skips = skips if part == 0 else UNCOUNTED
    try:
        handle = open(name, "rb")  # closed below; a module-level name, so tests can count what is read
    except OSError as err:
        whole_file_skips.add("read_error", name, err)
        return
    with handle:
        try:
            size = handle.seek(0, os.SEEK_END)
            start, end = byte_range(size, part, parts)
            columns, header_end = None, 0
            if suffix == ".csv":
                handle.seek(0)
                header = handle.readline()
                header_end = len(header)
                columns = _csv_columns(header, name, whole_file_skips)
                if columns is None:
                    return
            for offset, line in _lines_starting_in(handle, max(start, header_end), end):
                pair = _pair_from_line(line, columns, f"{name}@{offset}", skips)
                if pair is not None:
                    yield pair
        except OSError as err:
            skips.add("read_error", name, err)


def _lines_starting_in(handle: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line of ``handle`` that starts in ``[start, end)``; the last one may end after
    ``end``. Reads about ``end - start`` bytes plus the two lines that straddle the ends."""
    if start > 0:
        handle.seek(start - 1)
        handle.readline()  # the line running into ``start`` (only its newline when one ends at start - 1)
    else:
        handle.seek(0)
    offset = handle.tell()
    while offset < end:
        line = handle.readline()
        if not line:
            return
        yield offset, line
        offset += len(line)


def _csv_columns(header: bytes, name: str, skips: SkipCounter) -> list[str] | None:
    """The column names of a csv header line (a UTF-8 byte-order mark allowed), or None, counted, if unusable."""
    try:
        cells = next(csv.reader([header.decode("utf-8-sig").rstrip("\r\n")]), None)
    except (UnicodeDecodeError, csv.Error) as err:
        skips.add("read_error", name, f"csv header: {err}")
        return None
    columns = [c.strip() for c in cells] if cells else []
    if "query" not in columns or "positive" not in columns:
        skips.add("read_error", name, f"csv header {columns} lacks query/positive columns")
        return None
    return columns


def _pair_from_line(line: bytes, columns: list[str] | None, where: str, skips: SkipCounter) -> CaptionPair | None:
    """One raw line of a pair file: a jsonl object (``columns`` None) or a csv row under ``columns``."""
    bad = "bad_json" if columns is None else "bad_row"
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        skips.add(bad, where, err)
        return None
    if not text.strip():
        return None
    if columns is None:
        try:
            record = json.loads(text)
        except ValueError as err:
            skips.add("bad_json", where, err)
            return None
        return _pair_from_record(record, where, skips)
    if text.count('"') % 2:
        skips.add("quoted_newline", where, "a quoted cell spans lines (pair files are read line by line)")
        return None
    try:
        row = next(csv.reader([text]))
    except csv.Error as err:
        skips.add(bad, where, err)
        return None
    if not any(cell.strip() for cell in row):
        return None
    if len(row) != len(columns):
        skips.add("bad_row", where, f"{len(row)} cells for {len(columns)} columns")
        return None
    return _pair_from_record(dict(zip(columns, row)), where, skips)


def _cell(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _pair_from_record(record: object, where: str, skips: SkipCounter) -> CaptionPair | None:
    if not isinstance(record, dict):
        skips.add("bad_json", where, f"a {type(record).__name__}, not an object")
        return None
    query, positive = _cell(record.get("query")), _cell(record.get("positive"))
    raw_negative = record.get("negative")
    negative = _cell(raw_negative)
    if query is None or positive is None or (raw_negative not in (None, "") and negative is None):
        skips.add("missing_caption", where)
        return None
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        skips.add("bad_instruction", where, f"a {type(instruction).__name__}, not a string")
        return None
    skips.good()
    # Kept verbatim (its trailing separator matters), but a blank one means "none given", as an empty cell does.
    return CaptionPair(query, positive, negative, where, instruction=instruction if _cell(instruction) else None)


__all__ = [
    "PAIR_FILE_SUFFIXES",
    "UNCOUNTED",
    "CaptionPair",
    "byte_range",
    "read_pair_file",
    "read_pair_range",
]
