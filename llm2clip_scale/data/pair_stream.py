"""Stage-1 training stream: endless, shuffled, collated batches of one LLM data-parallel rank's caption pairs.

The stream runs in the training process (no DataLoader workers: reading caption json and tokenising a batch of
pairs is small next to the LLM's forward and backward), so the data is split by LLM-DP rank only, never by worker.
Each rank reads only its share of ``data.train_shards`` (:func:`llm2clip_scale.data.pairs.iter_caption_pairs`:
tar shards by rank, pair files by byte range); the TP/PP ranks of one model replica pass the same LLM-DP rank and
so read the same pairs in the same order.

``stage1.one_source_per_batch`` (LLM2Vec's batching of dataset mixes): every step's batch comes from one source, a
``::``-separated part of ``data.train_shards``. The source of step ``t`` is drawn by an RNG of the seed alone, with
probability proportional to the source's bytes (LLM2Vec shuffles all datasets' batches together, so a dataset's
share of batches is its share of the data); all LLM-DP ranks draw the same one, so the whole global batch — and
with it every in-batch negative of SimCSE, which spans the DP group — is one source's. Each source is its own
endless stream of passes over this rank's share of it (pass ``k`` reshuffled with (seed, source, k)).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.index import is_index, read_index
from llm2clip_scale.data.pairs import CaptionPair, batch_pairs, iter_caption_pairs
from llm2clip_scale.data.shards import SkipCounter


def shuffled(pairs: Iterable[CaptionPair], buffer: int, rng: random.Random) -> Iterator[CaptionPair]:
    """Buffer shuffle: the pair files and shards come in a fixed order, and in-batch negatives should not."""
    pool: list[CaptionPair] = []
    for pair in pairs:
        pool.append(pair)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


class PairBatches:
    """Endless collated batches of one LLM-DP rank's pairs; each pass over the data reshuffles with (seed, epoch).

    Resumable: a rank's pass is a pure function of (source, seed + epoch, rank, world size) (its shards and byte
    ranges are fixed by the split), so the position is just (epoch, batches taken in it). A resumed stream re-reads
    this rank's share of the epoch up to the position without tokenising it, then continues; the skip counts are
    then set to the saved ones, which already include everything the re-read pairs did. The state also records the
    split (rank, world size), which must match on load.
    """

    def __init__(self, cfg: Config, collate: Callable[[Sequence[CaptionPair]], dict], dp_rank: int, dp_size: int,
                 skips: SkipCounter) -> None:
        self.cfg, self.collate, self.dp_rank, self.dp_size, self.skips = cfg, collate, dp_rank, dp_size, skips
        self.pairs_per_rank = cfg.train.global_batch // dp_size
        self.epoch, self.taken = 0, 0
        # one_source_per_batch: each source stream's (pass, pairs taken in that pass), so a resume re-reads at most
        # the current pass of each source rather than every batch since the run began.
        self.source_positions: dict[int, tuple[int, int]] = {}
        self._saved_skips: dict[str, int] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "skips": dict(self.skips.counts),
                "rank": self.dp_rank, "world_size": self.dp_size,
                "source_positions": {str(k): list(v) for k, v in self.source_positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("rank", self.dp_rank), state.get("world_size", self.dp_size))
        if saved != (self.dp_rank, self.dp_size):
            raise ValueError(f"caption pairs: the saved stream is rank {saved[0]} of {saved[1]}, this one rank "
                             f"{self.dp_rank} of {self.dp_size}; a data position only carries over to the same split")
        self.epoch, self.taken, self._saved_skips = state["epoch"], state["taken"], dict(state["skips"])
        self.source_positions = {int(k): (int(v[0]), int(v[1]))
                                 for k, v in state.get("source_positions", {}).items()}

    def _pairs(self, source: str, seed: int) -> Iterator[CaptionPair]:
        s1 = self.cfg.stage1
        return iter_caption_pairs(
            source, self.skips, fields=s1.fields, rank=self.dp_rank, world_size=self.dp_size, seed=seed,
            random_direction=s1.random_direction, hard_negatives=s1.hard_negatives,
            negative_window=s1.negative_window, negative_mode=s1.negative_mode,
        )

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.stage1.one_source_per_batch:
            yield from self._one_source_batches()
            return
        cfg = self.cfg
        for epoch in itertools.count(self.epoch):
            pairs = self._pairs(cfg.data.train_shards, cfg.train.seed + epoch)
            rng = random.Random(f"stage1/shuffle/{cfg.train.seed}/{epoch}/{self.dp_rank}")
            stream = shuffled(pairs, cfg.data.shuffle_buffer, rng)
            skip = self.taken if epoch == self.epoch else 0
            for _ in itertools.islice(stream, skip * self.pairs_per_rank):
                pass
            if self._saved_skips is not None:
                self.skips.counts = self._saved_skips
                self._saved_skips = None
            self.epoch, self.taken = epoch, skip
            for batch in batch_pairs(stream, self.collate, self.pairs_per_rank):
                self.taken += 1
                yield batch
            if self.taken == 0:
                raise ValueError(f"data.train_shards: LLM data-parallel rank {self.dp_rank} of {self.dp_size} has "
                                 f"fewer good pairs in its share than one batch of {self.pairs_per_rank} "
                                 f"(skipped: {self.skips.counts}); give more data or fewer ranks")

    def _one_source_batches(self) -> Iterator[dict]:
        """Module doc. The source draws are replayed for the ``taken`` batches (random numbers only, no reading); each
        source stream resumes at its saved (pass, position), re-reading only that pass's share up to it (without
        tokenising), so a resumed run continues exactly. ``epoch`` is not advanced here; it only seeds the draws
        and passes, so a stream started with another one (a run resumed on a new split) is a fresh one."""
        cfg = self.cfg
        sources = cfg.data.train_shards.split("::")
        weights = [float(_source_bytes(source)) for source in sources]
        if sum(weights) <= 0:
            raise ValueError(f"stage1.one_source_per_batch: every source of data.train_shards is empty ({sources})")
        draws = random.Random(f"stage1/sources/{cfg.train.seed}/{self.epoch}")
        for _ in range(self.taken):
            draws.choices(range(len(sources)), weights)
        streams = {index: self._source_stream(sources[index], index, *position)
                   for index, position in self.source_positions.items()}
        if self._saved_skips is not None:  # after the re-reads above, whose skips the saved counts already hold
            self.skips.counts = self._saved_skips
            self._saved_skips = None
        while True:
            index = draws.choices(range(len(sources)), weights)[0]
            if index not in streams:
                streams[index] = self._source_stream(sources[index], index, self.epoch, 0)
            batch = list(itertools.islice(streams[index], self.pairs_per_rank))
            self.taken += 1
            yield self.collate(batch)

    def _source_stream(self, source: str, index: int, start_pass: int, position: int) -> Iterator[CaptionPair]:
        """This rank's pairs of one source from pass ``start_pass``, pair ``position`` on: positioned here and now
        (re-reading that pass up to ``position``, untokenised), not at its first pull."""
        stream = self._source_passes(source, index, start_pass)
        for _ in itertools.islice(stream, position):
            pass
        return stream

    def _source_passes(self, source: str, index: int, start_pass: int) -> Iterator[CaptionPair]:
        """Pass after pass from ``start_pass``, each reshuffled, keeping :attr:`source_positions` at the pairs
        handed out; raises when a pass yields none."""
        cfg = self.cfg
        for epoch in itertools.count(start_pass):
            rng = random.Random(f"stage1/shuffle/{cfg.train.seed}/source{index}/{epoch}/{self.dp_rank}")
            count = 0
            for pair in shuffled(self._pairs(source, cfg.train.seed + epoch), cfg.data.shuffle_buffer, rng):
                count += 1
                self.source_positions[index] = (epoch, count)
                yield pair
            if count == 0:
                raise ValueError(f"data.train_shards: source {index} ({source}) has no good pairs in the share of "
                                 f"LLM data-parallel rank {self.dp_rank} of {self.dp_size} (skipped: "
                                 f"{self.skips.counts}); give it more data, fewer ranks, or drop it")


def _source_bytes(source: str) -> int:
    """A source's size for its draw weight: a dataset index states it (no stat of 100k shards); else the files'."""
    if is_index(source):
        return read_index(source).bytes
    return sum(os.path.getsize(url) for url in expand_shards(source))


__all__ = ["PairBatches", "shuffled"]
