"""Tokens/s of the offline caption-embedding path against a plain transformers loop, on the same HF Llama checkpoint.

    python tools/bench_embed.py [--captions 1000 --hidden 256 --layers 4 --batch-size 64 --rounds 3]

(the defaults: about 7 minutes on 2 shared CPU cores; the time grows with captions x hidden^2 x layers)

One process, CPU, float32. It builds a random Llama checkpoint with transformers (``save_pretrained``), a word-level
tokenizer (the synthetic data set's kind: one token a word) and synthetic captions whose token counts are drawn
log-uniformly between ``--min-tokens`` and ``--max-tokens`` (BOS and EOS included), in random order, then embeds
them with:

- ``transformers``: ``AutoModel`` of the checkpoint, batches of ``--batch-size`` captions in file order, each padded
  to its longest caption, masked mean pooling of ``last_hidden_state``, under ``torch.inference_mode``;
- ``megatron, file order``: the frozen megatron tower as ``data_prep/embed_captions.py`` builds it (TP=1, PP=1,
  imported from the checkpoint), through :func:`llm2clip_scale.data.sidecar_writer.embed_caption_texts` with
  ``sort_window=0`` — the same batches as the transformers loop;
- ``megatron, length-bucketed``: the same, as embed_captions runs it (captions sorted by token count within
  ``--sort-window``).

The tower is built causal (``bidirectional=False``) for this comparison: the transformers model is causal, and the
vectors are checked to agree (relative error per vector <= ``--tolerance``). Megatron's local attention computes every
query-key score and masks afterwards, causal or not, so a bidirectional tower (LLM2CLIP's) does the same work.

The paths alternate, ``--rounds`` times each after one warm-up batch each; the table gives the median seconds, real
(non-pad) tokens per second — the same tokens for every path — the positions the model computed (padding included)
and the ratio to the transformers loop. Exit status 1 when the vectors do not agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1000, help="captions embedded per round")
    parser.add_argument("--hidden", type=int, default=256, help="model width (heads of 64)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per forward, both paths")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each path, alternating")
    parser.add_argument("--min-tokens", type=int, default=5, help="shortest caption, in tokens with BOS/EOS")
    parser.add_argument("--max-tokens", type=int, default=200, help="longest caption, in tokens with BOS/EOS")
    parser.add_argument("--sort-window", type=int, default=None,
                        help="captions length-sorted together (default: embed_captions' default)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative vector difference allowed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.hidden % 64 or args.hidden < 64:
        parser.error("--hidden must be a multiple of 64 (heads of 64)")
    if not 3 <= args.min_tokens <= args.max_tokens <= 512:
        parser.error("need 3 <= --min-tokens <= --max-tokens <= 512")
    if args.captions < 1 or args.batch_size < 1 or args.rounds < 1 or args.layers < 1:
        parser.error("--captions, --batch-size, --rounds and --layers must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------ inputs


def make_captions(count: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """Captions of the synthetic vocabulary; word-level tokens, so a caption of n words is n + 2 tokens."""
    from llm2clip_scale.data.synthetic import vocabulary_words

    words = vocabulary_words()
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        tokens = round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        captions.append(" ".join(rng.choice(words) for _ in range(max(tokens - 2, 1))))
    return captions


def build_checkpoint(root: Path, captions: list[str], hidden: int, layers: int, max_tokens: int, seed: int) -> None:
    """A tokenizer (root/tokenizer) and a random Llama checkpoint (root/llama) the tower can import."""
    from transformers import LlamaConfig, LlamaModel

    from llm2clip_scale.data.synthetic import train_tokenizer

    vocab = train_tokenizer(captions[:200], root / "tokenizer")
    heads = hidden // 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64 * math.ceil(hidden * 8 / 3 / 64),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=max(max_tokens, 8), rms_norm_eps=1e-5, initializer_range=0.05,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    LlamaModel(config).eval().save_pretrained(root / "llama")  # the decoder only: what both paths load


# ------------------------------------------------------------------------------------------------------- paths


def transformers_path(model: torch.nn.Module, tokenizer, captions: list[str], batch_size: int,
                      max_len: int) -> tuple[np.ndarray, int]:
    """The plain loop: file-order batches, masked mean pooling. Returns the vectors and the positions computed."""
    out = np.zeros((len(captions), model.config.hidden_size), dtype=np.float32)
    positions = 0
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            enc = tokenizer(captions[start : start + batch_size], padding="longest", truncation=True,
                            max_length=max_len, return_tensors="pt")
            states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"][..., None].to(states.dtype)
            out[start : start + batch_size] = ((states * mask).sum(1) / mask.sum(1)).numpy()
            positions += enc["input_ids"].numel()
    return out, positions


def _init_single_process() -> None:
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import build_topology, init_distributed

    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        init_distributed("gloo")
    build_topology(1, 1)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-vector ||a - b|| / ||b||."""
    diff = np.linalg.norm(a.astype(np.float64) - b, axis=1)
    return float((diff / np.maximum(np.linalg.norm(b.astype(np.float64), axis=1), 1e-30)).max())


def run(args: argparse.Namespace) -> dict:
    import transformers
    from transformers import AutoModel

    from llm2clip_scale.data.loader import load_tokenizer
    from llm2clip_scale.data.sidecar_writer import DEFAULT_SORT_WINDOW, EmbedStats, embed_caption_texts
    from llm2clip_scale.models.llm.hf_import import llm_config_from_hf
    from llm2clip_scale.models.llm.tower import build_text_tower

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    sort_window = DEFAULT_SORT_WINDOW if args.sort_window is None else args.sort_window
    captions = make_captions(args.captions, args.min_tokens, args.max_tokens, args.seed)
    max_len = args.max_tokens
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        root = Path(tmp)
        build_checkpoint(root, captions, args.hidden, args.layers, args.max_tokens, args.seed)
        tokenizer = load_tokenizer(str(root / "tokenizer"))
        hf = AutoModel.from_pretrained(root / "llama", dtype=torch.float32).eval()
        _init_single_process()
        # As embed_captions builds it (frozen, eval, fp32 = train.precision fp32), but causal like the HF model.
        cfg = llm_config_from_hf(root / "llama", bidirectional=False, max_seq_len=max_len,
                                 tokenizer=str(root / "tokenizer"))
        tower = build_text_tower(cfg, params_dtype=torch.float32, trainable=False, device="cpu")

        def megatron(window: int) -> Callable[[], tuple[np.ndarray, EmbedStats]]:
            def go() -> tuple[np.ndarray, EmbedStats]:
                stats = EmbedStats()
                vectors = embed_caption_texts(tower, tokenizer, captions, max_len, args.batch_size, "cpu", "plain",
                                              sort_window=window, stats=stats)
                return vectors, stats
            return go

        paths: dict[str, Callable[[], object]] = {
            "transformers (file order)": lambda: transformers_path(hf, tokenizer, captions, args.batch_size, max_len),
            "megatron tower, file order": megatron(0),
            "megatron tower, length-bucketed": megatron(sort_window),
        }
        # Warm-up: one batch each (first-call allocations, kernel selection).
        transformers_path(hf, tokenizer, captions[: args.batch_size], args.batch_size, max_len)
        embed_caption_texts(tower, tokenizer, captions[: args.batch_size], max_len, args.batch_size, "cpu", "plain")
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        outputs: dict[str, object] = {}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                elapsed, outputs[name] = _timed(fn)
                seconds[name].append(elapsed)
    hf_vectors, hf_positions = outputs["transformers (file order)"]
    file_vectors, file_stats = outputs["megatron tower, file order"]
    bucket_vectors, bucket_stats = outputs["megatron tower, length-bucketed"]
    tokens = bucket_stats.tokens
    assert file_stats.tokens == tokens
    positions = {"transformers (file order)": hf_positions, "megatron tower, file order": file_stats.positions,
                 "megatron tower, length-bucketed": bucket_stats.positions}
    errors = {"megatron tower, file order": _rel_err(file_vectors, hf_vectors),
              "megatron tower, length-bucketed": _rel_err(bucket_vectors, hf_vectors)}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    reference = tokens / medians["transformers (file order)"]
    rows = [{"path": name, "median_s": medians[name], "runs_s": seconds[name], "tokens": tokens,
             "tokens_per_s": tokens / medians[name], "positions": positions[name],
             "padding_pct": 100.0 * (positions[name] - tokens) / tokens,
             "ratio": tokens / medians[name] / reference, "max_rel_err": errors.get(name)} for name in paths]
    return {
        "captions": args.captions, "hidden": args.hidden, "layers": args.layers, "batch_size": args.batch_size,
        "rounds": args.rounds, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens,
        "sort_window": sort_window, "threads": torch.get_num_threads(), "tolerance": args.tolerance,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rows": rows,
        "vectors_match": max(errors.values()) <= args.tolerance, "max_rel_err": max(errors.values()),
    }


def format_table(result: dict) -> str:
    lines = [
        f"captions {result['captions']} ({result['min_tokens']}-{result['max_tokens']} tokens, log-uniform), "
        f"Llama hidden {result['hidden']} x {result['layers']} layers, fp32, batch {result['batch_size']}, "
        f"{result['rounds']} rounds each (median), {result['threads']} torch threads",
        "",
        "| path | median s | real tokens | tokens/s | positions computed | padding | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['path']} | {row['median_s']:.2f} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} | "
                     f"{row['positions']:,} | {row['padding_pct']:.0f}% | {row['ratio']:.2f}x |")
    verdict = "matched" if result["vectors_match"] else "DIFFER"
    lines += ["", f"vectors {verdict}: largest relative difference to transformers {result['max_rel_err']:.2e} "
                  f"(tolerance {result['tolerance']:.0e})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llm2clip_scale.distributed.topology import shutdown

    args = _args(argv)
    try:
        result = run(args)
    finally:
        shutdown()
    print(format_table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["vectors_match"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
