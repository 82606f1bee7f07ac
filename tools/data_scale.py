"""The data side of a run at scale, as arithmetic: storage, build and embedding time, online vs offline cost, and the
loader rate that keeps a GPU busy. docs/SCALE.md is this tool's output with the measured inputs it names.

    python tools/data_scale.py                      # LLM2CLIP x10: 150M images, 3 caption fields, ViT-E, Llama-3-8B
    python tools/data_scale.py --images 15e6 --vision vit_so400m_patch14_siglip_224 --gpu-tflops 989

Measured inputs (defaults: this machine, commands in docs/SCALE.md) are per CPU core: shard build, validation and
loader rates and the bytes of one built sample. Stated inputs are hardware figures (GPU peak, the MFU a run reaches,
cores per node, filesystem bandwidth). Vision FLOPs come from the project's FLOP model
(llm2clip_scale/metrics/flops.py: the timm model built on the meta device, each matmul with the tokens it sees, plus
attention); LLM FLOPs from 2 x parameters per token.
"""

from __future__ import annotations

import argparse
import math

from llm2clip_scale.metrics.flops import vision_forward_flops

TB = 1e12
TAR_BLOCK = 512


def tar_member_bytes(payload: int) -> int:
    """A tar member: one 512-byte header, the payload padded to a whole 512-byte block."""
    return TAR_BLOCK + math.ceil(payload / TAR_BLOCK) * TAR_BLOCK


def sidecar_bytes_per_caption(width: int, dtype_bytes: int) -> int:
    # numpy's .npy header for a 1-D array is 128 bytes (format 1.0, padded to a 64-byte boundary).
    return tar_member_bytes(128 + width * dtype_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=float, default=150e6, help="image-caption samples (LLM2CLIP: ~15M; x10)")
    p.add_argument("--caption-tokens", default="raw=24,short=64,long=192",
                   help="caption fields and their mean token counts (each embedded once offline)")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--bytes-per-sample", type=float, default=135e3,
                   help="one built sample (JPEG + json + tar headers); measured, see docs/SCALE.md")
    p.add_argument("--build-rate", type=float, default=170.0, help="build_shards samples/s per CPU core (measured)")
    p.add_argument("--validate-rate", type=float, default=400.0, help="validate_shards samples/s per core (measured)")
    p.add_argument("--loader-rate", type=float, default=95.0,
                   help="training loader samples/s per worker core at the tower's image size (measured)")
    p.add_argument("--cores-per-node", type=int, default=96, help="CPU cores of one node (stated)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--vision", default="eva02_enormous_patch14_clip_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--llm-params", type=float, default=7.5e9, help="LLM matmul parameters (Llama-3-8B: 7.5e9)")
    p.add_argument("--embedding-dim", type=int, default=4096)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation a run reaches (stated)")
    p.add_argument("--llm-mfu", type=float, default=0.50, help="MFU of the frozen LLM's forward (stated)")
    p.add_argument("--read-gbps", type=float, default=2.0, help="filesystem read bandwidth per node, GB/s (stated)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data by the stage-2 run")
    return p.parse_args(argv)


def table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"### {title}", "", f"| {'quantity'.ljust(width)} | value |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> str:
    fields = {name: float(tokens) for name, tokens in (item.split("=") for item in args.caption_tokens.split(","))}
    images, captions = args.images, args.images * len(fields)
    shards = math.ceil(images / args.samples_per_shard)
    image_bytes = images * args.bytes_per_sample
    node_rate = args.build_rate * args.cores_per_node
    build_h, shard_gb = images / node_rate / 3600, args.samples_per_shard * args.bytes_per_sample / 1e9
    out = [table("Image shards", [
        ("samples", f"{images:,.0f} images, {captions:,.0f} captions ({len(fields)} fields)"),
        ("shards", f"{shards:,} of {args.samples_per_shard:,} samples, {shard_gb:.2f} GB each"),
        ("image shard bytes", f"{image_bytes / TB:.2f} TB"),
        ("build time, one node", f"{build_h:,.1f} h ({node_rate:,.0f} samples/s on {args.cores_per_node} cores)"),
        ("build time, 32-node array", f"{build_h / 32:,.1f} h"),
        ("validation time, one node", f"{images / (args.validate_rate * args.cores_per_node) / 3600:,.1f} h"),
    ])]

    rows = []
    for name, dtype_bytes in (("bfloat16", 2), ("float16", 2), ("float32", 4)):
        per = sidecar_bytes_per_caption(args.embedding_dim, dtype_bytes)
        rows.append((f"sidecars, {name}", f"{per:,} B per caption in the tar -> {captions * per / TB:.2f} TB"))
    out.append(table(f"Embedding cache ({args.embedding_dim}-wide)", rows))

    llm_tokens = images * sum(fields.values())
    llm_flops = 2.0 * args.llm_params * llm_tokens
    vision_fwd, vision_params, tokens = vision_forward_flops(args.vision, args.image_size)
    vision_train = 3.0 * vision_fwd  # forward + backward (2x): model FLOPs, without recomputation
    per_gpu = args.gpu_tflops * 1e12 * args.mfu / vision_train
    vision_gpu_h = args.epochs * images / per_gpu / 3600
    mean_tokens = sum(fields.values()) / len(fields)
    llm_rate = args.gpu_tflops * 1e12 * args.llm_mfu  # FLOP/s of the frozen LLM's forward on one GPU
    online_gpu_h = args.epochs * images * 2.0 * args.llm_params * mean_tokens / llm_rate / 3600
    llm_gpu_h = llm_flops / llm_rate / 3600
    sidecar = sidecar_bytes_per_caption(args.embedding_dim, 2)
    read_per_gpu = per_gpu * (args.bytes_per_sample + sidecar)
    out.append(table(f"Online vs offline ({args.epochs:g} epoch of stage 2)", [
        ("vision tower", f"{args.vision}: {vision_params / 1e9:.2f}B params, {tokens} tokens, "
                         f"{vision_train / 1e12:.2f} TFLOP per training sample"),
        ("stage-2 GPU time (vision side)",
         f"{vision_gpu_h:,.0f} GPU-h at {args.mfu:.0%} MFU of {args.gpu_tflops:g} TFLOP/s"),
        ("offline: embed every caption once",
         f"{llm_gpu_h:,.0f} GPU-h ({llm_tokens / 1e9:,.1f}B tokens, {args.llm_mfu:.0%} MFU), "
         f"then {captions * sidecar / TB:.2f} TB of bf16 sidecars"),
        ("online: embed the drawn caption each step",
         f"{online_gpu_h:,.0f} GPU-h per epoch (+{online_gpu_h / vision_gpu_h:.0%} of the vision side; fields drawn "
         "uniformly, padding not counted), no sidecar storage"),
        ("samples/s one GPU consumes", f"{per_gpu:,.0f}"),
        ("loader worker cores per GPU", f"{per_gpu / args.loader_rate:.1f} at {args.loader_rate:g} samples/s per core"),
        ("read bandwidth per node, offline", f"{read_per_gpu * args.gpus_per_node / 1e9:.2f} GB/s "
                                             f"(of {args.read_gbps:g} GB/s stated)"),
    ]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    print(report(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
