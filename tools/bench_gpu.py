"""Stage-2 steps of ViT-E and SO400M at real width on one GPU: MFU, TFLOP/s, step time and peak memory.

Prints a markdown table with the machine, the command and the date.

    tools/bench_gpu.sh                                  # every model on GPU 0 (bf16, ZeRO-0), the table on stdout
    tools/bench_gpu.sh --models vit_e --depth full      # the whole ViT-E (~100 GB: an H200 or B200)
    tools/bench_gpu.sh --device cpu                     # CPU smoke run: tiny depth and width, fp32, no MFU

The step is the project's own (train/stage2.Stage2Step around build_clip_model and build_engine: DeepSpeed, AdamW,
InfoNCE, the logit-scale clamp) in offline mode: random LLM embeddings through the adapter, random images, both
already on the device (no loader, no LLM). Model FLOPs per sample come from llm2clip_scale/metrics/flops.py
(vision forward + backward, adapter); MFU divides them by the GPU's dense peak (flops.PEAK_TFLOPS). Each model runs
in a process of its own on a GPU, so its peak memory is its own and an out-of-memory error ends only its row.

Default ViT-E depth: 32 of its 64 blocks, so that one 80 GB GPU holds it under ZeRO-0 in bf16. The estimate:
DeepSpeed's bf16 path at ZeRO-0 (FP16_UnfusedOptimizer around torch's AdamW) keeps bf16 weights and gradients
(4 B per trainable parameter), fp32 master weights (4 B), Adam's moments (8 B) and, during the step, an fp32 copy of
every gradient (4 B): 20 B per parameter. 32 blocks of 67.9M + the 0.27B adapter = 2.45e9 parameters -> 49 GB, plus
~6 GB of activations at micro-batch 64 (the checkpointed block inputs, 32 x 59 MB, and one block's recompute,
~3-4 GB): ~55 GB. 40 blocks would need ~66 GB, 48 ~77 GB; the full 64 ~100 GB (an H200 or B200: --depth full).
Per-block work is the same at every depth, so MFU at reduced depth stands for the full model's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Model:
    config: str
    vision: str
    image_size: int
    full_depth: int
    gpu_depth: int  # default depth on a GPU (fits 80 GB, see the module docstring)
    micro_batch: int  # the config's


MODELS = {
    "vit_e": Model("stage2_vit_e.yaml", "eva02_enormous_patch14_clip_224", 224, 64, 32, 64),
    "so400m_384": Model("stage2_so400m.yaml", "vit_so400m_patch14_siglip_384", 384, 27, 27, 128),
    "so400m_224": Model("stage2_so400m.yaml", "vit_so400m_patch14_siglip_224", 224, 27, 27, 128),
}
# The CPU smoke run: every tower at a tiny width and depth, small images, a 128-wide adapter.
CPU_SHAPE = {"depth": 2, "embed_dim": 64, "num_heads": 4, "image_size": 56, "adapter": 128, "embed": 64,
             "micro_batch": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available; cpu: the smoke run (tiny towers, fp32)")
    p.add_argument("--gpu", type=int, default=None, help="GPU index (sets CUDA_VISIBLE_DEVICES for the workers)")
    p.add_argument("--depth", default=None,
                   help="vision blocks: a number or 'full' (default: ViT-E 32, SO400M 27 = full; CPU 2)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per step (default: the config's; CPU 4)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--no-grad-checkpointing", action="store_true", help="the configs checkpoint every block")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # models to run in this process
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return args


def _device(args: argparse.Namespace) -> str:
    if args.device != "auto":
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _overrides(name: str, args: argparse.Namespace, device: str) -> tuple[list[str], dict]:
    model = MODELS[name]
    cpu = device == "cpu"
    depth = model.full_depth if args.depth == "full" else int(args.depth) if args.depth else (
        CPU_SHAPE["depth"] if cpu else model.gpu_depth)
    kwargs = {"depth": depth, **({"embed_dim": CPU_SHAPE["embed_dim"], "num_heads": CPU_SHAPE["num_heads"]}
                                 if cpu else {})}
    micro_batch = args.micro_batch or (CPU_SHAPE["micro_batch"] if cpu else model.micro_batch)
    precision = args.precision or ("fp32" if cpu else "bf16")
    inline = ", ".join(f"{k}: {v}" for k, v in kwargs.items())
    overrides = [
        f"model.vision.name={model.vision}", "model.vision.pretrained_path=null",
        f"model.vision.timm_kwargs={{{inline}}}",
        f"model.vision.image_size={CPU_SHAPE['image_size'] if cpu else model.image_size}",
        f"model.vision.grad_checkpointing={not args.no_grad_checkpointing}",
        f"train.micro_batch={micro_batch}", f"train.global_batch={micro_batch}", f"train.precision={precision}",
        f"parallel.zero_stage={args.zero_stage}", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
        f"parallel.backend={'gloo' if cpu else 'nccl'}", "train.warmup_steps=1", "train.steps=1000000",
    ]
    if cpu:
        overrides += [f"model.adapter.input_dim={CPU_SHAPE['adapter']}", f"model.embed_dim={CPU_SHAPE['embed']}"]
    return overrides, {"depth": depth, "full_depth": model.full_depth, "micro_batch": micro_batch,
                       "precision": precision}


def run_worker(names: list[str], args: argparse.Namespace, device: str) -> list[dict]:
    """Build and time each model in this process (world of one)."""
    import gc
    import resource

    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.losses import build_contrastive_loss
    from llm2clip_scale.metrics.flops import device_peak_tflops, flop_model, matmul_dtype
    from llm2clip_scale.models.clip import build_clip_model
    from llm2clip_scale.train.engine import build_engine
    from llm2clip_scale.train.loop import seed_everything
    from llm2clip_scale.train.stage2 import Stage2Step

    cuda = device == "cuda"
    steps, warmup = args.steps or (10 if cuda else 2), args.warmup or (3 if cuda else 1)
    rows = []
    topo = None
    for name in names:
        overrides, shape = _overrides(name, args, device)
        cfg = load_config(REPO / "configs" / MODELS[name].config, overrides)
        if topo is None:
            init_distributed(cfg.parallel.backend)
            topo = build_topology(1, 1)
        seed_everything(0)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        row = {"model": name, "vision": cfg.model.vision.name, "image_size": cfg.model.vision.image_size, **shape,
               "zero_stage": cfg.parallel.zero_stage, "grad_checkpointing": cfg.model.vision.grad_checkpointing}
        try:
            model = build_clip_model(cfg.model, device=topo.device, dtype=dtype)
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            engine = build_engine(model, cfg, 1, topo.device)
            step = Stage2Step(engine, None, topo, dtype, build_contrastive_loss(cfg.train.loss,
                                                                                cfg.train.loss_tile_size))
            b, size = cfg.train.micro_batch, cfg.model.vision.image_size
            gen = torch.Generator(device=topo.device).manual_seed(0)
            batch = {"images": torch.randn(b, 3, size, size, generator=gen, device=topo.device).to(dtype),
                     "llm_embeddings": torch.randn(b, cfg.model.adapter.input_dim, generator=gen,
                                                   device=topo.device).to(dtype)}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            losses = [step(batch) for _ in range(warmup)]
            times = []
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                losses.append(step(batch))  # a float, or the loss still on the device: synchronised below
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            losses = [float(loss) for loss in losses]
            per_sample = flop_model(cfg).per_sample(None)
            seconds = statistics.median(times)
            peak = device_peak_tflops(torch.cuda.get_device_name(), matmul_dtype(cfg.train.precision)) if cuda else None
            row.update(step_seconds=seconds, step_seconds_all=times, samples_per_s=b / seconds,
                       flops_per_sample=per_sample["model"], hardware_flops_per_sample=per_sample["hardware"],
                       model_tflops=b * per_sample["model"] / seconds / 1e12,
                       hardware_tflops=b * per_sample["hardware"] / seconds / 1e12, peak_tflops=peak,
                       mfu=None if peak is None else b * per_sample["model"] / seconds / 1e12 / peak,
                       losses=losses, finite=all(math.isfinite(x) for x in losses))
            if not row["finite"]:
                row["warning"] = "non-finite loss"
            if cuda:
                row.update(peak_memory_bytes=torch.cuda.max_memory_allocated(),
                           peak_reserved_bytes=torch.cuda.max_memory_reserved())
            else:  # the process's peak resident set (kilobytes on Linux): the host's analogue
                row.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            del engine, model, step, batch
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = f"out of memory ({str(err).splitlines()[0]}); try a smaller --depth or --micro-batch"
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(names: list[str], argv: list[str], args: argparse.Namespace, device: str) -> tuple[list[dict], dict]:
    """One worker process for ``names``: its rows (one error row per model when it died) and its machine facts."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port())}
        if args.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", device, "--worker", ",".join(names),
               "--result", str(result)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and result.is_file():
            out = json.loads(result.read_text())
            return out["rows"], out["machine"]
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        return [{"model": n, "error": f"worker exit {proc.returncode}: {tail[-600:]}"} for n in names], {}


def machine(device: str) -> dict:
    """Where the numbers come from; asked by a worker, so that the parent never opens a CUDA context."""
    import deepspeed
    import torch

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def table(rows: list[dict], info: dict, command: str, date: str) -> str:
    lines = ["### Stage-2 step on one device (offline: random LLM embeddings through the adapter)", "",
             f"- date: {date}", f"- command: `{command}`",
             "- machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "| model | vision blocks | trainable params | micro-batch | precision | ZeRO | checkpointing | step (ms) "
             "| samples/s | model TFLOP/s | hardware TFLOP/s | MFU | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('depth', '-')} | error: {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['model']} ({r['vision']}, {r['image_size']} px){' ' + r['warning'] if 'warning' in r else ''} "
            f"| {r['depth']} of {r['full_depth']} "
            f"| {_count(r['trainable_params'])} | {r['micro_batch']} | {r['precision']} | {r['zero_stage']} "
            f"| {'yes' if r['grad_checkpointing'] else 'no'} | {r['step_seconds'] * 1e3:.1f} "
            f"| {r['samples_per_s']:.2f} | {_fmt(r['model_tflops'], '.4g')} | {_fmt(r['hardware_tflops'], '.4g')} "
            f"| {'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} |")
    lines += ["", "Step: median of the timed steps, synchronised around each. Model FLOPs per sample "
              "(llm2clip_scale/metrics/flops.py): vision forward + backward and the adapter; hardware FLOPs add the "
              "recomputation of checkpointed blocks. MFU = model TFLOP/s / the GPU's dense peak (bf16, or fp32/tf32); "
              "no MFU without a known peak (CPU). Peak memory: torch.cuda.max_memory_allocated over the steps on a "
              "GPU, the process's peak resident set on the CPU."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = _device(args)
    if args.worker:
        rows = run_worker(args.worker.split(","), args, device)
        args.result.write_text(json.dumps({"rows": rows, "machine": machine(device)}))
        return 0
    names = args.models.split(",")
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    # On a GPU each model gets a clean process (its own peak memory; an OOM ends only its row); on the CPU one
    # process runs them all, which saves the imports. A later --device wins over the one in argv.
    runs = [_spawn([n], argv, args, device) for n in names] if device == "cuda" else [_spawn(names, argv, args, device)]
    rows = [row for run_rows, _ in runs for row in run_rows]
    info = next((facts for _, facts in runs if facts), {"device": device})
    command = (os.environ.get("BENCH_GPU_LAUNCHER", "python tools/bench_gpu.py") + " " + shlex.join(argv)).strip()
    print(table(rows, info, command, date))
    if args.json:
        args.json.write_text(json.dumps({"date": date, "command": command, "machine": info, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
