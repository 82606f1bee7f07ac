"""Embed the captions of image shards offline with the (tensor-parallel) LLM text tower into sidecar shards.

    torchrun --nproc_per_node N data_prep/embed_captions.py CONFIG --shards PATTERN --out DIR [key=value ...]

The tower is built from ``model.llm`` of CONFIG (``parallel.tensor_parallel`` ranks per tower, PP = 1), frozen, in
``train.precision``, with a stage-1 LoRA merged when ``model.llm.lora_init`` names one, and captions tokenised in
``model.llm.caption_format``, so offline vectors are those online stage 2 would compute. Whole image shards go to the
LLM-data-parallel groups (shard i to group i % (N / TP)); TP rank 0 of a group reads the captions, all ranks of the
group embed them, and TP rank 0 writes ``DIR/<image shard name>`` atomically. Within a shard, captions are sorted
by token count (``--sort-window`` at a time) so each batch pads only to near-equal lengths; vectors are stored in the
shard's order, as ``--dtype`` (bfloat16 by default; float16, float32). Sidecars already complete with the same
settings are skipped and a killed job leaves no partial sidecar, so an interrupted job is simply rerun: it redoes
only the shards without a sidecar. ``--shards`` takes a brace/glob pattern or a dataset index (``.../index.json``).
Point ``data.train_embedding_shards`` (or ``data.eval_embedding_shards``) at ``DIR`` with the image shards' brace
pattern to train offline. Format: :mod:`llm2clip_scale.data.sidecar`. Exit status 1 when some image shard could
not be read.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from llm2clip_scale.config.load import expand_shards, load_config
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.parts import part_slice
from llm2clip_scale.data.sidecar import DEFAULT_EMBEDDING_DTYPE, EMBEDDING_DTYPES
from llm2clip_scale.data.sidecar_writer import DEFAULT_SORT_WINDOW, SidecarReport, write_sidecars

logger = logging.getLogger("llm2clip_scale.data_prep.embed_captions")


def default_fields(cfg: Config) -> list[str]:
    """The fields stage 2 can draw: positive-weight ``data.caption_fields``, then ``data.eval_caption_field``."""
    fields = [name for name, weight in cfg.data.caption_fields.items() if weight > 0]
    if cfg.data.eval_caption_field and cfg.data.eval_caption_field not in fields:
        fields.append(cfg.data.eval_caption_field)
    return fields


def model_source(cfg: Config) -> dict:
    """What identifies the embedding model in the sidecar header: a restart with another model redoes the shards."""
    from llm2clip_scale.checkpoint.layout import resolve_lora_path, sha256_file

    llm = cfg.model.llm
    return {
        "hf_checkpoint": llm.hf_checkpoint,
        # The stage-1 LoRA merged into the tower, by content: a retrained LoRA at the same path redoes the shards.
        "lora_sha256": sha256_file(resolve_lora_path(llm.lora_init)) if llm.lora_init else None,
        "caption_format": llm.caption_format,
        "seed": None if llm.hf_checkpoint else llm.seed,
        "num_layers": llm.num_layers,
        "hidden_size": llm.hidden_size,
        "bidirectional": llm.bidirectional,
        "tokenizer": llm.tokenizer,
        "precision": cfg.train.precision,
    }


def embed_captions(
    cfg: Config,
    image_urls: Sequence[str],
    out_dir: str | Path,
    fields: Sequence[str] | None = None,
    batch_size: int = 64,
    dtype: str = DEFAULT_EMBEDDING_DTYPE,
    sort_window: int = DEFAULT_SORT_WINDOW,
) -> SidecarReport:
    """Collective over the initialised world: set up TP groups, build the frozen tower, write this group's sidecars.

    The caller has run ``init_distributed``; this builds the topology with ``cfg.parallel.tensor_parallel`` and PP 1.
    """
    from llm2clip_scale.data.loader import load_tokenizer
    from llm2clip_scale.distributed.topology import build_topology
    from llm2clip_scale.models.llm.tower import build_text_tower

    if cfg.parallel.pipeline_parallel != 1:
        raise ValueError("parallel.pipeline_parallel: offline embedding runs the tower with PP = 1; use TP instead")
    if not cfg.model.llm.tokenizer:
        raise ValueError("model.llm.tokenizer: the caption tokenizer directory is required")
    topo = build_topology(cfg.parallel.tensor_parallel, 1)
    from megatron.core import parallel_state

    params_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    tower = build_text_tower(cfg.model.llm, params_dtype=params_dtype, trainable=False, device=topo.device)
    return write_sidecars(
        tower,
        load_tokenizer(cfg.model.llm.tokenizer),
        list(image_urls),
        out_dir,
        list(fields) if fields else default_fields(cfg),
        cfg.data.max_text_len,
        llm_dp_rank=topo.llm_dp_rank,
        llm_dp_size=topo.llm_dp_size,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        batch_size=batch_size,
        dtype=dtype,
        device=topo.device,
        source=model_source(cfg),
        caption_format=cfg.model.llm.caption_format,
        sort_window=sort_window,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (model.llm, parallel.tensor_parallel, data.max_text_len, ...)")
    parser.add_argument("--shards", required=True, help="image shard pattern, e.g. data/train-{000000..000099}.tar, "
                        "or a dataset index (.../index.json)")
    parser.add_argument("--out", required=True, help="directory for the sidecar shards")
    parser.add_argument("--fields", default="", help="comma-separated caption fields (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per tower forward")
    parser.add_argument("--dtype", choices=EMBEDDING_DTYPES, default=DEFAULT_EMBEDDING_DTYPE,
                        help="stored vector dtype (default %(default)s: float32's range at half the size)")
    parser.add_argument("--sort-window", type=int, default=DEFAULT_SORT_WINDOW,
                        help="captions of a shard sorted by token count together before batching (default "
                        "%(default)s; 0 = file order)")
    parser.add_argument("--part", default="0/1", help="I/N: embed only the I-th of N contiguous slices of the shards "
                        "(one Slurm array task each: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor_parallel=2")
    # Intermixed: overrides may follow the options (CONFIG --shards P --out D key=value), which parse_args rejects.
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from llm2clip_scale.distributed.backend import collective_device
    from llm2clip_scale.distributed.topology import init_distributed, shutdown

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.batch_size < 1 or args.sort_window < 0:
        print("embed_captions: --batch-size must be >= 1 and --sort-window >= 0", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    urls = expand_shards(args.shards)
    if not urls:
        print(f"embed_captions: --shards {args.shards!r} matches no shards", file=sys.stderr)
        return 2
    try:
        urls = part_slice(urls, args.part)
    except ValueError as err:
        print(f"embed_captions: {err}", file=sys.stderr)
        return 2
    fields = [f.strip() for f in args.fields.split(",") if f.strip()] or None
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    started = time.perf_counter()
    try:
        report = embed_captions(cfg, urls, args.out, fields, batch_size=args.batch_size, dtype=args.dtype,
                                sort_window=args.sort_window)
        # Every group's outcome, summed: one line from rank 0, and a non-zero exit on every rank if anything failed.
        totals = torch.tensor(
            [len(report.written), len(report.reused), len(report.failed), report.samples, report.captions,
             report.stats.tokens, report.stats.padding]
            if report.writer else [0] * 7,
            dtype=torch.long, device=collective_device(),
        )
        dist.all_reduce(totals)
        written, reused, failed, samples, captions, tokens, padding = totals.tolist()
        if dist.get_rank() == 0:
            elapsed = time.perf_counter() - started
            logger.info(
                "embed captions: %d sidecars written, %d already complete, %d image shards unreadable; %d samples, "
                "%d captions, %d tokens (+%.0f%% padding) in %.1f s (%.0f tokens/s) -> %s", written, reused, failed,
                samples, captions, tokens, 100.0 * padding / max(tokens, 1), elapsed, tokens / max(elapsed, 1e-9),
                args.out,
            )
    finally:
        shutdown()
    return 1 if failed else 0


if __name__ == "__main__":  # guard: megatron helpers may spawn processes that re-import this file
    sys.exit(main())
