"""Stage-1 caption-pair data: (query, positive[, hard negative]) from webdataset shards or jsonl/csv pair files.

- Shards: two different caption fields of the same image make a pair (e.g. short and long dense captions); which
  one queries is random per pair from a seeded RNG, and the query's instruction follows the direction.
- Pair files: ``.jsonl`` objects or ``.csv`` rows with columns ``query``, ``positive`` and optionally ``negative``.
- Hard negatives: where a pair has none, :func:`attach_hard_negatives` takes a caption of a *different* image from a
  small look-ahead/look-behind window of the stream, preferring the one that shares most words with the positive
  (a near miss is what teaches fine distinctions); captions textually equal to the query or positive are never used,
  as two images with one caption would make a false negative.

Bad input never stops a run; it is skipped and counted by reason in a :class:`SkipCounter`: ``read_error`` (file or
shard unreadable), ``bad_json`` (sample json / jsonl line that does not parse to an object), ``bad_row`` (csv row
with the wrong number of cells), ``missing_caption`` (fewer than two distinct non-empty captions in a sample; an
empty or non-string query/positive/negative in a pair file), ``no_negative`` (no other image to draw a negative from).
"""

from __future__ import annotations

import csv
import json
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.data.prompts import MAX_TEXT_LEN, instruction_for, tokenize_captions
from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, read_shards

PAIR_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")
DEFAULT_NEGATIVE_WINDOW = 16


@dataclass(frozen=True)
class CaptionPair:
    query: str
    positive: str
    negative: str | None = None
    group: str = ""  # the image (sample key) or file row the captions describe; negatives come from another group
    query_field: str | None = None
    positive_field: str | None = None


# ---------------------------------------------------------------------------------------------------------- shards


def pairs_from_samples(
    samples: Iterable[dict],
    fields: Sequence[str],
    rng: random.Random,
    skips: SkipCounter,
    random_direction: bool = True,
) -> Iterator[CaptionPair]:
    """Webdataset samples (``__key__``, ``json`` bytes) -> pairs of two different ``fields`` of each sample.

    With more than two usable fields, two are drawn at random. ``random_direction=False`` keeps ``fields`` order
    (query = the earlier field), as caption-retrieval evaluation needs.
    """
    if len(set(fields)) < 2:
        raise ValueError(f"caption pairs need at least two distinct caption fields, got {list(fields)}")
    for sample in samples:
        key = sample.get("__key__", "?")
        meta, reason, detail = parse_meta(sample)
        if meta is None:
            skips.add(reason, key, detail)
            continue
        present = [(f, text) for f in fields if (text := caption_of(meta, f)) is not None]
        # Two fields holding the same text would make a trivial pair; keep the first field of each text.
        distinct: dict[str, tuple[str, str]] = {}
        for name, text in present:
            distinct.setdefault(text, (name, text))
        options = list(distinct.values())
        if len(options) < 2:
            skips.add("missing_caption", key)
            continue
        skips.good()
        first, second = rng.sample(options, 2) if len(options) > 2 else options
        if random_direction:
            if rng.random() < 0.5:
                first, second = second, first
        elif len(options) > 2:
            first, second = sorted((first, second), key=lambda option: fields.index(option[0]))
        yield CaptionPair(first[1], second[1], None, key, first[0], second[0])


# ------------------------------------------------------------------------------------------------------ pair files


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
    skips.good()
    return CaptionPair(query, positive, negative, where)


def read_pair_file(path: str | Path, skips: SkipCounter) -> Iterator[CaptionPair]:
    """Pairs of one ``.jsonl`` or ``.csv`` file (csv: a header row naming query, positive[, negative]).

    Blank lines are not rows. An empty csv ``negative`` cell means "no negative given", like an absent jsonl key.
    """
    path = Path(path)
    if path.suffix not in PAIR_FILE_SUFFIXES:
        raise ValueError(f"{path}: pair files must end in {' or '.join(PAIR_FILE_SUFFIXES)}")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if path.suffix == ".jsonl":
                yield from _jsonl_pairs(handle, str(path), skips)
            else:
                yield from _csv_pairs(handle, str(path), skips)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        skips.add("read_error", str(path), err)


def _jsonl_pairs(handle: Iterable[str], name: str, skips: SkipCounter) -> Iterator[CaptionPair]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            skips.add("bad_json", where, err)
            continue
        pair = _pair_from_record(record, where, skips)
        if pair is not None:
            yield pair


def _csv_pairs(handle: Iterable[str], name: str, skips: SkipCounter) -> Iterator[CaptionPair]:
    reader = csv.reader(handle)
    header = next(reader, None)
    columns = [c.strip() for c in header] if header else []
    if "query" not in columns or "positive" not in columns:
        skips.add("read_error", name, f"csv header {columns} lacks query/positive columns")
        return
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name}:{reader.line_num}"
        if len(row) != len(columns):
            skips.add("bad_row", where, f"{len(row)} cells for {len(columns)} columns")
            continue
        pair = _pair_from_record(dict(zip(columns, row)), where, skips)
        if pair is not None:
            yield pair


# ------------------------------------------------------------------------------------------------- hard negatives


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def attach_hard_negatives(
    pairs: Iterable[CaptionPair], rng: random.Random, skips: SkipCounter, window: int = DEFAULT_NEGATIVE_WINDOW
) -> Iterator[CaptionPair]:
    """Give every pair without a negative the caption of another group from a window of ``window`` pairs around it.

    A pair waits until ``window - 1`` later pairs arrived (look-ahead), and the last ``window`` emitted pairs are
    kept (look-behind), so the first pairs of a stream have candidates too. Among candidates of other groups, the
    positive-side caption sharing most words with the positive wins (ties at random). Pairs that already carry a
    negative pass through untouched (in stream order).
    """
    if window < 2:
        raise ValueError(f"hard-negative window must be >= 2, got {window}")
    ahead: deque[CaptionPair] = deque()
    behind: deque[CaptionPair] = deque(maxlen=window)

    def emit(pair: CaptionPair) -> CaptionPair | None:
        behind_and_ahead = [*behind, *list(ahead)[1:]]
        if pair.negative is not None:
            return pair
        banned = {pair.query, pair.positive}
        candidates = [
            c.positive for c in behind_and_ahead if c.group != pair.group and c.positive not in banned
        ] + [c.query for c in behind_and_ahead if c.group != pair.group and c.query not in banned]
        if not candidates:
            skips.add("no_negative", pair.group)
            return None
        target = _words(pair.positive)
        scores = [len(target & _words(c)) for c in candidates]
        best = max(scores)
        chosen = rng.choice(sorted({c for c, s in zip(candidates, scores) if s == best}))
        return replace(pair, negative=chosen)

    for pair in pairs:
        ahead.append(pair)
        if len(ahead) == window:
            out = emit(ahead[0])
            behind.append(ahead.popleft())
            if out is not None:
                yield out
    while ahead:
        out = emit(ahead[0])
        behind.append(ahead.popleft())
        if out is not None:
            yield out


# ------------------------------------------------------------------------------------------------------- sources


def _is_pair_file(url: str) -> bool:
    return url.endswith(PAIR_FILE_SUFFIXES)


def iter_caption_pairs(
    source: str,
    skips: SkipCounter,
    fields: Sequence[str] = ("short", "long"),
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    random_direction: bool = True,
    hard_negatives: bool = True,
    negative_window: int = DEFAULT_NEGATIVE_WINDOW,
) -> Iterator[CaptionPair]:
    """One pass over ``source`` (a brace/glob pattern of ``.tar`` shards and/or ``.jsonl``/``.csv`` pair files;
    ``::`` joins patterns), this rank's share of it, in a deterministic order.

    ``rank``/``world_size`` are data-parallel coordinates (the LLM-DP group in stage 1; TP ranks of one group must
    pass the same rank and so read the same pairs). Pairs are dealt round-robin over the good pairs of the whole
    source (pair ``i`` goes to rank ``i % world_size``), so ranks get disjoint, near-equal shares however few files
    there are; every rank reads everything, which is cheap for captions. Negatives are attached after dealing, from
    this rank's own stream, with an RNG seeded by (seed, rank).
    """
    urls = expand_shards(source) if source else []
    if not urls:
        raise ValueError(f"caption pairs: {source!r} matches no files")
    if not 0 <= rank < world_size:
        raise ValueError(f"caption pairs: rank {rank} must lie in [0, world_size={world_size})")
    direction_rng = random.Random(f"pairs/direction/{seed}")  # same on every rank: all see the whole stream

    def every_pair() -> Iterator[CaptionPair]:
        for url in urls:
            if _is_pair_file(url):
                yield from read_pair_file(url, skips)
            else:
                samples = read_shards([{"url": url}], skips)
                yield from pairs_from_samples(samples, fields, direction_rng, skips, random_direction)

    def mine() -> Iterator[CaptionPair]:
        for index, pair in enumerate(every_pair()):
            if index % world_size == rank:
                yield pair

    if not hard_negatives:
        return mine()
    return attach_hard_negatives(mine(), random.Random(f"pairs/negatives/{seed}/{rank}"), skips, negative_window)


# ------------------------------------------------------------------------------------------------------ batching


class PairCollator:
    """Pairs -> tensors. Queries carry an instruction (``instruction`` if given, else one chosen by the pair's
    direction); positives and negatives are embedded as plain captions, as in LLM2Vec's supervised training.

    Batch keys: ``query_{input_ids,attention_mask,pool_mask}``, ``positive_{...}`` and, when every pair has a
    negative, ``negative_{...}`` (long, (b, L) each), plus ``groups`` (list of str).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, instruction: str | None = None, max_len: int = MAX_TEXT_LEN,
                 caption_format: str = "plain"):
        self.tokenizer, self.instruction, self.max_len = tokenizer, instruction, max_len
        self.caption_format = caption_format

    def __call__(self, pairs: Sequence[CaptionPair]) -> dict:
        if not pairs:
            raise ValueError("PairCollator: empty batch")
        instructions = [
            self.instruction if self.instruction is not None else instruction_for(p.query_field, p.positive_field)
            for p in pairs
        ]
        batch: dict = {"groups": [p.group for p in pairs]}
        sides = [("query", instructions, [p.query for p in pairs]), ("positive", "", [p.positive for p in pairs])]
        negatives = [p.negative for p in pairs]
        if all(n is not None for n in negatives):
            sides.append(("negative", "", negatives))
        elif any(n is not None for n in negatives):
            raise ValueError("PairCollator: some pairs of the batch have a negative and some do not")
        for side, side_instructions, texts in sides:
            ids, mask, pool = tokenize_captions(self.tokenizer, texts, self.caption_format, side_instructions,
                                                self.max_len)
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_pool_mask"] = ids, mask, pool
        return batch


def batch_pairs(
    pairs: Iterable[CaptionPair], collate: PairCollator, batch_size: int, keep_partial: bool = False
) -> Iterator[dict]:
    """Group ``pairs`` into collated batches of ``batch_size`` (the last, short one only with ``keep_partial``)."""
    current: list[CaptionPair] = []
    for pair in pairs:
        current.append(pair)
        if len(current) == batch_size:
            yield collate(current)
            current = []
    if current and keep_partial:
        yield collate(current)


def shard_source(paths: Sequence[str | Path]) -> str:
    """Join file paths into one ``::``-separated source pattern for :func:`iter_caption_pairs`."""
    return "::".join(str(p) for p in paths)


__all__ = [
    "CaptionPair",
    "PairCollator",
    "attach_hard_negatives",
    "batch_pairs",
    "iter_caption_pairs",
    "pairs_from_samples",
    "read_pair_file",
    "shard_source",
]
