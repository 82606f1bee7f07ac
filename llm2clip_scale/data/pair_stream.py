"""Stage-1 training stream: endless, shuffled, collated batches of one LLM data-parallel rank's caption pairs.

The stream runs in the training process (no DataLoader workers: reading caption json and tokenising a batch of
pairs is small next to the LLM's forward and backward), so the data is split by LLM-DP rank only, never by worker.
Each rank reads only its share of ``data.train_shards`` (:func:`llm2clip_scale.data.pairs.iter_caption_pairs`:
tar shards by rank, pair files by byte range); the TP/PP ranks of one model replica pass the same LLM-DP rank and
so read the same pairs in the same order.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from llm2clip_scale.config.schema import Config
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
        self._saved_skips: dict[str, int] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "skips": dict(self.skips.counts),
                "rank": self.dp_rank, "world_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("rank", self.dp_rank), state.get("world_size", self.dp_size))
        if saved != (self.dp_rank, self.dp_size):
            raise ValueError(f"caption pairs: the saved stream is rank {saved[0]} of {saved[1]}, this one rank "
                             f"{self.dp_rank} of {self.dp_size}; a data position only carries over to the same split")
        self.epoch, self.taken, self._saved_skips = state["epoch"], state["taken"], dict(state["skips"])

    def __iter__(self) -> Iterator[dict]:
        cfg, s1 = self.cfg, self.cfg.stage1
        for epoch in itertools.count(self.epoch):
            pairs = iter_caption_pairs(
                cfg.data.train_shards, self.skips, fields=s1.fields, rank=self.dp_rank, world_size=self.dp_size,
                seed=cfg.train.seed + epoch, random_direction=s1.random_direction, hard_negatives=s1.hard_negatives,
                negative_window=s1.negative_window,
            )
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


__all__ = ["PairBatches", "shuffled"]
