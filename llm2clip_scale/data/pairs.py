"""Stage-1 caption-pair data: (query, positive[, hard negative]) from webdataset shards or jsonl/csv pair files.

- Shards: two different caption fields of the same image make a pair (e.g. short and long dense captions); which
  one queries is random per pair from a seeded RNG, and the query's instruction follows the direction.
- Pair files: ``.jsonl`` objects or ``.csv`` rows with columns ``query``, ``positive`` and optionally ``negative``,
  read by :mod:`llm2clip_scale.data.pair_files` (format, byte-range split and the skips it counts are there).
- Hard negatives: where a pair has none, :func:`attach_hard_negatives` takes a caption of a *different* image from a
  small look-ahead/look-behind window of the stream: ``mined`` (default) prefers the one that shares most words
  with the positive (a near miss is what teaches fine distinctions), ``random`` draws any of them uniformly (a
  random other image: an easier negative, the control for what mining adds); captions textually equal to the query
  or positive are never used, as two images with one caption would make a false negative.

Bad input never stops a run; it is skipped and counted by reason in a :class:`SkipCounter`: for shards
``read_error`` (shard unreadable), ``bad_json`` (sample json that does not parse to an object), ``missing_caption``
(fewer than two distinct non-empty captions in a sample); for pair files those of
:mod:`~llm2clip_scale.data.pair_files`; and ``no_negative`` (no other image to draw a negative from).

Splitting over LLM data-parallel ranks (:func:`iter_caption_pairs`): each rank reads only its share. ``.tar`` shards
go to ranks by :func:`~llm2clip_scale.data.shards.rank_shards` (shard ``i`` to rank ``i % W``); with fewer shards
than ranks every rank reads all of them and keeps every ``W``-th good pair (logged once). A ``.jsonl``/``.csv`` file
is split by bytes: rank ``r`` of ``W`` reads byte range ``r`` of ``W`` of it (:func:`read_pair_range`). Every skip
is counted by exactly one rank, so counts sum over ranks to those of one process reading everything. CRA
evaluation instead deals the pairs of the whole source (``deal=True``), which needs them in source order; it reads
pair files whole, with the same parser (:func:`read_pair_file`).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.data.pair_files import (
    PAIR_FILE_SUFFIXES,
    UNCOUNTED,
    CaptionPair,
    read_pair_file,
    read_pair_range,
)
from llm2clip_scale.data.prompts import MAX_TEXT_LEN, instruction_for, tokenize_captions
from llm2clip_scale.data.shards import SkipCounter, caption_of, parse_meta, rank_shards, read_shards

logger = logging.getLogger("llm2clip_scale.data")

DEFAULT_NEGATIVE_WINDOW = 16


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


# ------------------------------------------------------------------------------------------------- hard negatives


def _words(text: str) -> set[str]:
    return set(text.lower().split())


NEGATIVE_MODES = ("mined", "random")


def attach_hard_negatives(
    pairs: Iterable[CaptionPair], rng: random.Random, skips: SkipCounter, window: int = DEFAULT_NEGATIVE_WINDOW,
    mode: str = "mined",
) -> Iterator[CaptionPair]:
    """Give every pair without a negative the caption of another group from a window of ``window`` pairs around it.

    A pair waits until ``window - 1`` later pairs arrived (look-ahead), and the last ``window`` emitted pairs are
    kept (look-behind), so the first pairs of a stream have candidates too. Among candidates of other groups,
    ``mode="mined"`` takes the caption sharing most words with the positive (ties at random), ``mode="random"``
    any candidate, uniformly; either way the draws come from ``rng`` alone, so a seed fixes them. Pairs that already
    carry a negative pass through untouched (in stream order).
    """
    if window < 2:
        raise ValueError(f"hard-negative window must be >= 2, got {window}")
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"hard-negative mode {mode!r} unknown; use one of {', '.join(NEGATIVE_MODES)}")
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
        if mode == "random":
            # Sorted and deduplicated, as for mined ties: the draw depends on the set of captions, not on their order.
            return replace(pair, negative=rng.choice(sorted(set(candidates))))
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


_few_shards_logged: set[tuple[str, int]] = set()


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
    deal: bool = False,
    negative_mode: str = "mined",
) -> Iterator[CaptionPair]:
    """One pass over ``source`` (a brace/glob pattern of ``.tar`` shards and/or ``.jsonl``/``.csv`` pair files;
    ``::`` joins patterns), this rank's share of it, in a deterministic order.

    ``rank``/``world_size`` are data-parallel coordinates (the LLM-DP group in stage 1; TP/PP ranks of one replica
    must pass the same rank and so read the same pairs). By default each rank reads only its share (module doc:
    shards by rank, pair files by byte range); a pair and its direction depend on the sample alone (a shard's
    direction RNG is seeded by (seed, shard)), so the ranks' pairs together are exactly those of ``world_size=1``.

    ``deal=True`` is the global dealing CRA relies on: every rank reads the whole source and keeps good pair ``i``
    when ``i % world_size == rank``, so the first ``N`` pairs of the source are spread over the ranks in order
    (a pair file is then read whole: :func:`~llm2clip_scale.data.pair_files.read_pair_file`). Skip counts are then
    every rank's own.

    Negatives are attached after splitting, from this rank's own stream, with an RNG seeded by (seed, rank),
    ``negative_mode`` (mined or random) choosing among the candidates (:func:`attach_hard_negatives`).
    """
    urls = expand_shards(source) if source else []
    if not urls:
        raise ValueError(f"caption pairs: {source!r} matches no files")
    if not 0 <= rank < world_size:
        raise ValueError(f"caption pairs: rank {rank} must lie in [0, world_size={world_size})")
    read = _dealt_pairs if deal else _rank_pairs
    pairs = read(urls, skips, fields, rank, world_size, seed, random_direction)
    if not hard_negatives:
        return pairs
    return attach_hard_negatives(pairs, random.Random(f"pairs/negatives/{seed}/{rank}"), skips, negative_window,
                                 negative_mode)


def _dealt_pairs(urls: list[str], skips: SkipCounter, fields: Sequence[str], rank: int, world_size: int, seed: int,
                 random_direction: bool) -> Iterator[CaptionPair]:
    """Every rank reads everything and keeps every ``world_size``-th good pair (``deal=True``)."""
    direction_rng = random.Random(f"pairs/direction/{seed}")  # same on every rank: all see the whole stream
    index = 0
    for url in urls:
        if _is_pair_file(url):
            pairs = read_pair_file(url, skips)
        else:
            pairs = pairs_from_samples(read_shards([{"url": url}], skips), fields, direction_rng, skips,
                                       random_direction)
        for pair in pairs:
            if index % world_size == rank:
                yield pair
            index += 1


def _rank_pairs(urls: list[str], skips: SkipCounter, fields: Sequence[str], rank: int, world_size: int, seed: int,
                random_direction: bool) -> Iterator[CaptionPair]:
    """This rank's share, in source order: its shards, its byte range of every pair file (module doc)."""
    tars = [url for url in urls if not _is_pair_file(url)]
    shared = 0 < len(tars) < world_size
    if shared:
        if (key := ("::".join(tars), world_size)) not in _few_shards_logged:
            _few_shards_logged.add(key)
            logger.warning(
                "caption pairs: %d tar shard(s) for %d data-parallel ranks; every rank reads all of them and keeps "
                "every %d-th good pair (give at least %d shards to split them by rank)",
                len(tars), world_size, world_size, world_size)
        mine = set(range(len(tars)))
    else:
        mine = set(rank_shards(range(len(tars)), rank, world_size, what="caption pairs"))
    tar_index = raw = dealt = 0
    for url in urls:
        if _is_pair_file(url):
            yield from read_pair_range(url, skips, rank, world_size)
            continue
        index, tar_index = tar_index, tar_index + 1
        if index not in mine:
            continue
        direction_rng = random.Random(f"pairs/direction/{seed}/{index}/{url}")
        if not shared:
            samples = read_shards([{"url": url}], skips)
            yield from pairs_from_samples(samples, fields, direction_rng, skips, random_direction)
            continue
        # Read by every rank: each keeps every world_size-th good pair, and each skip is counted by one rank only
        # (a shard's read error by rank index % W, a bad sample by rank raw % W), so counts add up over ranks.
        for sample in read_shards([{"url": url}], skips if index % world_size == rank else UNCOUNTED):
            sample_skips = skips if raw % world_size == rank else UNCOUNTED
            raw += 1
            for pair in pairs_from_samples([sample], fields, direction_rng, sample_skips, random_direction):
                if dealt % world_size == rank:
                    yield pair
                dealt += 1


# ------------------------------------------------------------------------------------------------------ batching


class PairCollator:
    """Pairs -> tensors. Queries carry an instruction (the pair's own if it has one, else ``instruction`` if given,
    else one chosen by the pair's direction); positives and negatives are embedded as plain captions, as in
    LLM2Vec's supervised training.

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
        # A pair's own instruction (a pair file's column) is the most specific, so it wins over the configured one.
        instructions = [
            p.instruction if p.instruction is not None
            else self.instruction if self.instruction is not None
            else instruction_for(p.query_field, p.positive_field)
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
    "NEGATIVE_MODES",
    "CaptionPair",
    "PairCollator",
    "attach_hard_negatives",
    "batch_pairs",
    "iter_caption_pairs",
    "pairs_from_samples",
    "read_pair_file",
    "read_pair_range",
    "shard_source",
]
