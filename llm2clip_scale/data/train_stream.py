"""One rank's endless, resumable stream of training batches over a weighted mix of datasets.

Used by :class:`llm2clip_scale.data.loader.TrainLoader`, which runs it in DataLoader workers. Knows no models.

Resampled: each dataset's shards are drawn with replacement in blocks, so a stream never ends and a rank with one
shard (fewer shards than ranks × workers) keeps drawing it under its own seeds instead of running dry or hanging.
Mixed: each training example comes from dataset ``i`` with probability ``weight_i / Σ weights``, drawn per good
example (a dataset with many bad samples still gets its share of usable ones), whatever the datasets' sizes.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import webdataset as wds
from torch.utils.data import IterableDataset

from llm2clip_scale.config.schema import DataConfig
from llm2clip_scale.data.samples import Collator, Example, ImageTransform, seeded, train_examples, worker_id
from llm2clip_scale.data.shards import MAX_CONSECUTIVE_SKIPS, SkipCounter
from llm2clip_scale.data.sidecar import EmbeddingDecoder, read_paired_shards

logger = logging.getLogger("llm2clip_scale.data")
STATE_KEY = "__stream_state__"


@dataclass(frozen=True)
class RankSource:
    """One dataset as a rank sees it: its share of (image shard, sidecar or None) pairs and how to draw captions."""

    name: str
    shards: list[tuple[str, str | None]]
    caption_fields: dict[str, float]
    weight: float


class _Cursor:
    """Where a raw stream stands: shard block, and raw samples of it already taken (bad ones included)."""

    def __init__(self, block: int, offset: int) -> None:
        self.block, self.offset = block, offset


def _random_state(state: list | tuple) -> tuple:
    # The DataLoader's batch conversion turns the stamped tuples into lists; random.setstate wants tuples back.
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _mixed(streams: list[Iterator[Example]], weights: list[float], rng: random.Random) -> Iterator[Example]:
    population = range(len(streams))
    while True:
        yield next(streams[rng.choices(population, weights)[0]])


class TrainStream(IterableDataset):
    """One rank's infinite stream of training batches; built fresh in each worker so seeds see the worker id.

    Exact resume without replaying the run: each dataset's stream is cut into blocks of ``data.shuffle_block_shards``
    distinct shards. Block ``k`` draws its shards and its shuffle order from seeds of (seed, rank, worker, pass,
    dataset, k) alone, and the shuffle buffer drains at the block's end, so a dataset's position is just (block, raw
    samples taken from it). Every batch carries the positions after its last sample, the mixing, caption and
    augmentation RNG states and the skip counts at that moment; a resumed worker re-reads at most one block per
    dataset up to its position without decoding images, then restores the RNGs and counts. (webdataset's
    ResampledShards and shuffle keep their state in the iterator, which cannot be saved or fast-forwarded, hence the
    hand-written draw.)
    """

    def __init__(
        self,
        sources: list[RankSource],
        data_cfg: DataConfig,
        tokenizer_path: str | None,
        image_size: int,
        micro_batch: int,
        rank: int,
        seed: int,
        max_text_len: int,
        embedding_dim: int | None,
        caption_format: str,
        images: bool = True,
    ) -> None:
        super().__init__()
        self.images = images
        self.sources, self.cfg, self.tokenizer_path = sources, data_cfg, tokenizer_path
        self.image_size, self.micro_batch, self.rank, self.seed = image_size, micro_batch, rank, seed
        self.max_text_len, self.embedding_dim, self.caption_format = max_text_len, embedding_dim, caption_format
        self.offline = sources[0].shards[0][1] is not None
        self.pass_index = 0  # which iter() of the TrainLoader this is; part of every seed
        # Set by TrainLoader.load_state_dict before workers start: saved worker states by logical worker id, and
        # the rotation that makes physical worker 0 continue the logical worker whose batch comes next.
        self.resume_states: dict[int, dict] = {}
        self.worker_rotation = 0
        self.num_logical_workers = 1

    def _raw_samples(self, stream: tuple, index: int, cursor: _Cursor, skips: SkipCounter) -> Iterator[dict]:
        """Samples of dataset ``index``, blocks ``cursor.block``, ``+1``, …; ``cursor`` advances with each sample."""
        cfg = self.cfg
        sidecars = dict(self.sources[index].shards)
        urls = list(sidecars)
        # Dataset 0 keeps the seed names of the single-dataset stream, so runs and checkpoints from before mixing
        # existed continue unchanged; other datasets add their index.
        tag = (index,) if index else ()
        for block in itertools.count(cursor.block):
            # Distinct shards within a block (drawn with replacement across blocks): a rank holding few shards must
            # not see one sample several times within one shuffle window.
            draw = seeded("shards", *stream, *tag, block).sample(urls, k=min(cfg.shuffle_block_shards, len(urls)))
            sources = [{"url": url, "sidecar": sidecars[url]} for url in draw]
            samples: Iterator[dict] = read_paired_shards(sources, skips)  # plain shards pass through (sidecar None)
            if cfg.shuffle_buffer > 1:
                samples = wds.shuffle(cfg.shuffle_buffer, rng=seeded("shuffle", *stream, *tag, block))(samples)
            cursor.block, cursor.offset = block, 0
            for sample in samples:
                cursor.offset += 1
                yield sample

    def _positions(self, saved: dict | None, label: str) -> list[tuple[int, int]]:
        """(block, offset) per dataset to resume from; a dataset the checkpoint did not know starts afresh."""
        if saved is None:
            return [(0, 0)] * len(self.sources)
        if "datasets" not in saved:  # a checkpoint from before mixing: one dataset
            saved = {"datasets": {self.sources[0].name: {"block": saved["block"], "offset": saved["offset"]}}}
        known = saved["datasets"]
        fresh = [source.name for source in self.sources if source.name not in known]
        if fresh:
            logger.warning("%s: datasets %s are not in the checkpoint's loader state; they start fresh", label, fresh)
        return [(known[s.name]["block"], known[s.name]["offset"]) if s.name in known else (0, 0) for s in self.sources]

    def __iter__(self) -> Iterator[dict]:
        worker = (worker_id() + self.worker_rotation) % self.num_logical_workers
        label = f"train data rank {self.rank} worker {worker}"
        skips = SkipCounter(label, MAX_CONSECUTIVE_SKIPS)
        stream = (self.seed, self.rank, worker, self.pass_index)
        cfg = self.cfg
        captions_rng = seeded("captions", *stream)
        augment_rng = seeded("augment", *stream)
        mix_rng = seeded("mix", *stream)
        saved = self.resume_states.get(worker)
        cursors = [_Cursor(block, 0) for block, _ in self._positions(saved, label)]
        raws = [self._raw_samples(stream, i, cursor, skips) for i, cursor in enumerate(cursors)]
        if saved:
            # Fast-forward: re-read each dataset's block up to the saved position (no image decoding), then take
            # the saved RNG states and counts, which already include everything the skipped samples did.
            for raw, (_, offset) in zip(raws, self._positions(saved, label)):
                for _ in itertools.islice(raw, offset):
                    pass
            captions_rng.setstate(_random_state(saved["captions_rng"]))
            augment_rng.setstate(_random_state(saved["augment_rng"]))
            if "mix_rng" in saved:
                mix_rng.setstate(_random_state(saved["mix_rng"]))
            skips.counts = dict(saved["skips"])
        transform = (ImageTransform(self.image_size, cfg.image_mean, cfg.image_std, cfg.augment, augment_rng)
                     if self.images else None)
        embeddings = EmbeddingDecoder(self.embedding_dim, label) if self.offline else None
        per_dataset = [
            train_examples(raw, source.caption_fields, transform, captions_rng, skips, embeddings, source.name)
            for raw, source in zip(raws, self.sources)
        ]
        examples = per_dataset[0] if len(per_dataset) == 1 else _mixed(
            per_dataset, [source.weight for source in self.sources], mix_rng
        )
        collate = Collator(None if self.offline else self.tokenizer_path, self.max_text_len, worker, skips,
                           self.caption_format)

        def state() -> dict:
            return {"datasets": {source.name: {"block": cursor.block, "offset": cursor.offset}
                                 for source, cursor in zip(self.sources, cursors)},
                    "mix_rng": mix_rng.getstate(), "captions_rng": captions_rng.getstate(),
                    "augment_rng": augment_rng.getstate(), "skips": skips.snapshot()}

        # No look-ahead between batches (unlike the eval stream's ``batched``): the state stamped on a batch must be
        # the one right after its last sample, or a resumed stream would skip or repeat samples.
        while True:
            batch = collate(list(itertools.islice(examples, self.micro_batch)))
            batch[STATE_KEY] = state()
            yield batch
