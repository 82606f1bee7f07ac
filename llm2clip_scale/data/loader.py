"""Webdataset loaders for image–caption shards: a resampled training stream and an exact, rank-partitioned eval stream.

The loader knows nothing of models: it takes shard patterns, a tokenizer directory and sizes. Two text modes:

- online (default): captions are tokenised in the workers; batches carry ``input_ids``/``attention_mask``.
- offline (``data.train_embedding_shards`` / ``data.eval_embedding_shards`` set): every image shard is read with
  its sidecar shard of precomputed LLM embeddings (:mod:`llm2clip_scale.data.sidecar`), joined by key; batches
  carry ``llm_embeddings`` float32 (b, d) instead, and no tokenizer is needed. The caption field is drawn exactly as
  online (same weights, same RNG stream), so one seed picks the same fields in both modes.

Bad data never stops a run. Samples are skipped and counted by reason:

- ``read_error``: a shard that cannot be opened or read to its end (missing, truncated, corrupt tar). Samples before
  the damage still come through; the sample being read when it happened is dropped with the shard's remainder.
- ``missing_image``: no jpg/jpeg/png/webp member.  ``bad_image``: image bytes that PIL cannot decode.
- ``bad_json``: a json member that does not parse to an object.
- ``missing_caption``: no json, or none of the wanted caption fields holds a non-empty string.
- offline only: ``missing_embedding``, ``wrong_embedding_dim``, ``bad_embedding``, ``sidecar_read_error`` (see
  :mod:`llm2clip_scale.data.sidecar`).

DataLoader workers are separate processes, so each worker keeps cumulative counts and stamps a snapshot on every batch
it makes; the main process keeps the latest snapshot per worker and reports the exact sum as ``batch["skipped"]``.
Shard reading, shard lists and skip counting live in :mod:`llm2clip_scale.data.shards`, sample decoding and
collation in :mod:`llm2clip_scale.data.samples`; the public names are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import partial

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from llm2clip_scale.config.schema import DataConfig, train_sources
from llm2clip_scale.data.samples import (
    Collator,
    ImageTransform,
    batched,
    eval_examples,
    load_tokenizer,
    seeded,
    worker_id,
)
from llm2clip_scale.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_CONSECUTIVE_SKIPS,
    SKIPPED_KEY,
    WORKER_KEY,
    SkipCounter,
    SkipTally,
    paired_shard_list,
    rank_shards,
    read_shard,
    read_shards,
)
from llm2clip_scale.data.sidecar import EmbeddingDecoder, read_paired_shards
from llm2clip_scale.data.train_stream import STATE_KEY, RankSource, TrainStream

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CONSECUTIVE_SKIPS",
    "EvalLoader",
    "SkipCounter",
    "SkipTally",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "load_tokenizer",
    "read_shard",
    "read_shards",
]

logger = logging.getLogger("llm2clip_scale.data")


# ------------------------------------------------------------------------------------------------------- datasets


def _with_sidecars(sources: Iterable[dict], sidecars: dict[str, str]) -> Iterator[dict]:
    """Pipeline stage: attach sidecar i to image shard i (ResampledShards and SimpleShardList yield urls only)."""
    for source in sources:
        yield {**source, "sidecar": sidecars[source["url"]]}


def _source_stages(shards: list[tuple[str, str | None]], skips: SkipCounter) -> list:
    """Reader stages after the shard-list stage: plain shards, or image + sidecar shards joined by key."""
    if shards[0][1] is None:
        return [partial(read_shards, skips=skips)]
    sidecars = {image: sidecar for image, sidecar in shards}
    return [partial(_with_sidecars, sidecars=sidecars), partial(read_paired_shards, skips=skips)]


class _EvalStream(IterableDataset):
    """All eval shards in order, validated in full, this rank's share transformed and batched."""

    def __init__(
        self,
        shards: list[tuple[str, str | None]],
        data_cfg: DataConfig,
        tokenizer_path: str | None,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        max_samples: int | None,
        max_text_len: int,
        field: str,
        embedding_dim: int | None,
        caption_format: str,
    ) -> None:
        super().__init__()
        self.shards, self.cfg, self.tokenizer_path = shards, data_cfg, tokenizer_path
        self.image_size, self.batch_size, self.rank, self.world_size = image_size, batch_size, rank, world_size
        self.max_samples, self.max_text_len, self.field = max_samples, max_text_len, field
        self.embedding_dim, self.caption_format = embedding_dim, caption_format
        self.offline = shards[0][1] is not None

    def __iter__(self) -> Iterator[dict]:
        label = f"eval data rank {self.rank}"
        skips = SkipCounter(label)
        transform = ImageTransform(self.image_size, self.cfg.image_mean, self.cfg.image_std, "none", None)
        collate = Collator(None if self.offline else self.tokenizer_path, self.max_text_len, worker_id(), skips,
                           self.caption_format)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([image for image, _ in self.shards]),
            *_source_stages(self.shards, skips),
            partial(
                eval_examples,
                field=self.field,
                limit=self.max_samples,
                rank=self.rank,
                world_size=self.world_size,
                transform=transform,
                skips=skips,
                embeddings=EmbeddingDecoder(self.embedding_dim, label) if self.offline else None,
            ),
            partial(batched, batch_size=self.batch_size, collate=collate, keep_partial=True),
        )
        return iter(pipeline)


# -------------------------------------------------------------------------------------------------------- loaders


class TrainLoader:
    """Infinite iterable of training batches for one rank, resumable to the exact batch.

    A fresh loader with the same (seed, rank, num_workers) yields the same batches; each further ``iter()`` of one
    loader starts new workers on a new deterministic stream (seeds include the pass number), never a replay.
    ``state_dict()`` describes the position after the batches consumed so far; a new loader given it through
    ``load_state_dict()`` yields exactly the batches that would have come next (same num_workers required).

    Batch keys: ``images`` float32 (b,3,H,W), ``input_ids`` and ``attention_mask`` long (b,L) (online) or
    ``llm_embeddings`` float32 (b,d) (offline), ``keys``, ``captions``, ``caption_fields`` (lists of str) and
    ``skipped`` (cumulative counts by reason over all workers).
    """

    def __init__(self, dataset: TrainStream, num_workers: int, label: str) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.label = label
        self._passes = 0
        self._consumed = 0  # batches handed out in the current pass
        self._worker_states: dict[int, dict] = {}
        dataset.num_logical_workers = max(num_workers, 1)

    def __iter__(self) -> Iterator[dict]:
        tally = SkipTally(self.label)
        for worker, saved in self._worker_states.items():
            tally.absorb({WORKER_KEY: worker, SKIPPED_KEY: saved["skips"]})
        logical = max(self.num_workers, 1)
        # A second iter() continues with fresh seeds rather than replaying the first pass (set before workers fork).
        self.dataset.pass_index = self._passes
        self.dataset.resume_states = dict(self._worker_states)
        self.dataset.worker_rotation = self._consumed % logical
        self._passes += 1
        seed = seeded("dataloader", self.dataset.seed, self.dataset.rank, self.dataset.pass_index).getrandbits(63)
        for batch in _data_loader(self.dataset, self.num_workers, seed):
            state = batch.pop(STATE_KEY)
            worker = int(batch[WORKER_KEY])
            self._worker_states[worker] = state
            self._consumed += 1
            yield tally.absorb(batch)

    def state_dict(self) -> dict:
        return {"pass_index": self._passes - 1 if self._passes else 0, "consumed": self._consumed,
                "num_workers": self.num_workers, "workers": {w: dict(s) for w, s in self._worker_states.items()}}

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by reason, over all workers (as of the last batch handed out)."""
        totals: dict[str, int] = {}
        for state in self._worker_states.values():
            for reason, count in state["skips"].items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def start_fresh_pass(self) -> None:
        """Resume without a saved position (the layout changed): new seeds, so the first batches are not replayed."""
        self._passes = max(self._passes, 1)

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"{self.label}: the checkpoint's loader ran {state['num_workers']} workers, this run has "
                f"data.num_workers={self.num_workers}; exact data resume needs the same count, so set it back"
            )
        self._passes = state["pass_index"]
        self._consumed = state["consumed"]
        self._worker_states = {int(w): dict(s) for w, s in state["workers"].items()}


class EvalLoader:
    """Finite, deterministic iterable of eval batches for one rank; ``last_skipped`` holds the final counts.

    Batch keys: those of :class:`TrainLoader` plus ``index`` (long, global sample indices) for all-gather and reorder.
    """

    def __init__(self, dataset: _EvalStream, num_workers: int, label: str) -> None:
        self.dataset = dataset
        # One worker at most: a second would interleave shards and break the global order every rank relies on.
        self.num_workers = min(num_workers, 1)
        self.label = label
        self.last_skipped: dict[str, int] = {}

    def __iter__(self) -> Iterator[dict]:
        tally = SkipTally(self.label, report_growth=False)
        for batch in _data_loader(self.dataset, self.num_workers, seed=0):
            yield tally.absorb(batch)
        self.last_skipped = tally.totals()
        if self.last_skipped:
            logger.warning("%s: skipped %d samples %s", self.label, sum(self.last_skipped.values()), self.last_skipped)


def _data_loader(dataset: IterableDataset, num_workers: int, seed: int) -> DataLoader:
    # Own generator: DataLoader draws worker base seeds from it, else from (and advancing) the global torch RNG.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=None,  # batches are made (and tokenised) inside the workers
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
    )


def _check_common(rank: int, world_size: int, batch: int, max_text_len: int, image_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"data loader: rank {rank} must lie in [0, world_size={world_size})")
    if batch < 1 or max_text_len < 2 or image_size < 1:
        raise ValueError(f"data loader: batch ({batch}), max_text_len ({max_text_len}) and image_size must be >= 1/2/1")


def _shards_for(
    images: str | None, sidecars: str | None, what: str, tokenizer_path: str | None, embedding_dim: int | None
) -> list[tuple[str, str | None]]:
    """(image, sidecar) shard pairs, after the mode's own checks (a tokenizer online, a sane size offline)."""
    shards = paired_shard_list(images, sidecars, what)
    if sidecars is None and not tokenizer_path:
        raise ValueError(f"{what}: online mode tokenises captions and needs a tokenizer path (model.llm.tokenizer)")
    if sidecars is not None:
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim: {embedding_dim} must be >= 1 (the adapter's input size)")
        # The resampler draws image urls; their sidecar is looked up by url, so a repeated url needs one sidecar.
        seen: dict[str, str | None] = {}
        for image, sidecar in shards:
            if seen.setdefault(image, sidecar) != sidecar:
                raise ValueError(f"{what}: {image} is listed twice with different sidecars")
    return shards


def build_train_loader(
    data_cfg: DataConfig,
    tokenizer_path: str | None,
    image_size: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    max_text_len: int,
    embedding_dim: int | None = None,
    caption_format: str = "plain",
    images: bool = True,
) -> TrainLoader:
    """Infinite, resampled training batches of ``micro_batch`` samples for ``rank`` of ``world_size``.

    ``rank``/``world_size`` are the data-parallel coordinates chosen by the caller (never read from the environment).
    Shards of ``data_cfg.train_shards`` are split across ranks, then resampled with replacement per DataLoader
    worker with seeds from (seed, rank, worker); samples pass a ``shuffle_buffer``, one caption per sample is drawn
    from ``caption_fields`` weights renormalised over the fields present. With ``data_cfg.train_datasets``, each
    dataset is split and resampled so, and each sample comes from dataset i with probability weight_i / Σ weights
    (``batch["datasets"]`` names it).

    Offline mode (``data_cfg.train_embedding_shards`` set): sidecar i travels with image shard i (through the rank
    split and resampling) and batches carry ``llm_embeddings`` float32 (b, d) of the drawn field instead of
    ``input_ids``/``attention_mask``/``pool_mask``; ``tokenizer_path`` may be None. ``embedding_dim`` (the adapter's
    input size) is checked on every vector; None trusts the first vector each worker sees. Online, captions are
    tokenised in ``caption_format`` (``model.llm.caption_format``, data/prompts.py).

    ``images=False``: a text-only stream for a stage that reads no pixels (ProCLIP stage 1): no image is decoded and
    batches carry no ``images``; a sample's image is then neither needed nor checked.
    """
    _check_common(rank, world_size, micro_batch, max_text_len, image_size)
    sources = []
    for i, source in enumerate(train_sources(data_cfg)):
        what = "data.train_shards" if not data_cfg.train_datasets else f"data.train_datasets[{i}].shards"
        if not source.caption_fields or not any(w > 0 for w in source.caption_fields.values()):
            raise ValueError(f"{what}: caption_fields: give at least one field with a positive weight")
        if not source.weight > 0:
            raise ValueError(f"{what}: weight {source.weight} must be > 0")
        shards = _shards_for(source.shards, source.embedding_shards, what, tokenizer_path, embedding_dim)
        sources.append(RankSource(source.name, rank_shards(shards, rank, world_size, f"train data {source.name}"),
                                  source.caption_fields, source.weight))
    if len({source.shards[0][1] is None for source in sources}) > 1:
        raise ValueError("data.train_datasets: mix of online and offline datasets; give every dataset "
                         "embedding_shards or none")
    dataset = TrainStream(
        sources,
        data_cfg,
        tokenizer_path,
        image_size,
        micro_batch,
        rank,
        seed,
        max_text_len,
        embedding_dim,
        caption_format,
        images,
    )
    return TrainLoader(dataset, data_cfg.num_workers, label=f"train data rank {rank}")


def build_eval_loader(
    data_cfg: DataConfig,
    tokenizer_path: str | None,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None,
    max_text_len: int,
    caption_field: str,
    embedding_dim: int | None = None,
    caption_format: str = "plain",
) -> EvalLoader:
    """Deterministic eval batches: the first N = min(max_samples, good samples) of ``eval_shards`` in order, N cut
    to a multiple of world_size, rank r taking global indices i % world_size == r. Every rank yields the same number
    of batches (the last may be smaller); ``batch["index"]`` gives the global indices for all-gather and reorder.

    Offline mode (``data_cfg.eval_embedding_shards`` set): as for :func:`build_train_loader`, batches carry
    ``llm_embeddings`` of ``caption_field``; a sample without a usable vector is not a good sample.
    """
    _check_common(rank, world_size, batch_size, max_text_len, image_size)
    shards = _shards_for(
        data_cfg.eval_shards, data_cfg.eval_embedding_shards, "data.eval_shards", tokenizer_path, embedding_dim
    )
    dataset = _EvalStream(
        shards,
        data_cfg,
        tokenizer_path,
        image_size,
        batch_size,
        rank,
        world_size,
        max_samples,
        max_text_len,
        caption_field,
        embedding_dim,
        caption_format,
    )
    return EvalLoader(dataset, data_cfg.num_workers, label=f"eval data rank {rank}")
