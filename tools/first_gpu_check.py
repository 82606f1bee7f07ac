"""Confirm or refute, on the first GPU node, what the code claims about GPUs: one PASS/FAIL/SKIP line per check.

    tools/first_gpu_check.sh [--quick] [--only NAME[,NAME...]] [--jobs N] [--keep] [--json FILE]
    python tools/first_gpu_check.py --list

About ten minutes on one GPU (>= 40 GB; an 80 GB or larger card leaves room for the concurrent runs). Every training
run and measurement gets a fresh process (``python -m llm2clip_scale train`` for training runs, this script's
``--worker`` mode for in-process probes), on tiny synthetic data the script generates in a temporary directory; up
to ``--jobs`` processes share the GPU at once, and the timing check (``big_step``) runs alone at the end.

Checks, in the order printed:

  backend                NCCL at world 1: ``parallel.backend: auto`` resolves to nccl, the topology's device is CUDA,
                         and the CPU compatibility shim (distributed/cpu_compat.py) stays inert
  fused_kernels          tools/check_fused_numerics.py (fused kernels vs torch references): its exit status
  nccl_stage2            2-step NCCL runs of every stage, world 1, ``parallel.backend=nccl`` (NCCL rejects host
  nccl_stage2_llm_lora   tensors handed to a collective, so a tensor left on the CPU fails the run): stage 2
  nccl_proclip_inherit   (configs/tiny_cpu.yaml), stage 2 training an LLM LoRA, ProCLIP stage 1, LLM2CLIP stage 1;
  nccl_llm2clip_cc       each with its end-of-run evaluation and checkpoint save
  trajectory_fp32        20 steps of the tiny stage 2 under ZeRO-2: GPU fp32 vs the same config on CPU (gloo) fp32
  trajectory_bf16        the same in bf16 vs CPU fp32, judged against an lr=0 control run
  te_vs_local            Transformer Engine layer spec vs megatron's local spec on a tiny tower: same weights (same
                         seed), pooled outputs in fp32 and bf16, bidirectional and causal
  host_memory            host memory while building a reduced ViT-E from a timm-layout safetensors file and a
                         reduced Llama-3-8B from an HF checkpoint onto the GPU in bf16 (streamed tensor by tensor)
  lora_bf16              LLM2CLIP stage 1 in bf16: LoRA parameters, gradients and AdamW state fp32 on the device
  big_step               a reduced-depth ViT-E + Llama-3-8B-width stage-2 step: peak memory and step time at two
                         depths, extrapolated linearly to the full model (and to the config's 128-rank layout)
  host_syncs             host synchronisations in one tiny stage-2 training step (torch.cuda.set_sync_debug_mode),
                         at two depths: a fixed handful, none per parameter tensor

Without CUDA the script is a smoke test: GPU-only checks print SKIP with the reason (some after running their code at
tiny scale on the CPU, which proves the script, not the claim); trajectory_bf16 compares CPU bf16 with CPU fp32 and
lora_bf16 runs on the CPU. ``--quick`` shortens the runs and leaves out the CPU smoke runs of GPU-only checks.

Exit status 1 if any check FAILs. Each process's output is kept under the work directory printed at the end (kept
when a check fails or with --keep).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# ``python tools/first_gpu_check.py`` puts tools/ first on sys.path: that is how gpu_check imports, in the driver and
# in every ``--worker`` process alike.
from gpu_check.checks import (
    check_backend,
    check_fused_kernels,
    check_lora_bf16,
    check_nccl_llm2clip_cc,
    check_nccl_proclip_inherit,
    check_nccl_stage2,
    check_nccl_stage2_llm_lora,
    check_te_vs_local,
    check_trajectory_bf16,
    check_trajectory_fp32,
)
from gpu_check.checks_scale import check_big_step, check_host_memory, check_host_syncs
from gpu_check.context import RESULT_TAG, Context, Row
from gpu_check.workers import worker_backend, worker_host_syncs, worker_lora_bf16, worker_te_vs_local
from gpu_check.workers_scale import worker_big_step, worker_host_memory, worker_write_checkpoints

CHECKS: dict[str, Callable[[Context], Row]] = {
    "backend": check_backend,
    "fused_kernels": check_fused_kernels,
    "nccl_stage2": check_nccl_stage2,
    "nccl_stage2_llm_lora": check_nccl_stage2_llm_lora,
    "nccl_proclip_inherit": check_nccl_proclip_inherit,
    "nccl_llm2clip_cc": check_nccl_llm2clip_cc,
    "trajectory_fp32": check_trajectory_fp32,
    "trajectory_bf16": check_trajectory_bf16,
    "te_vs_local": check_te_vs_local,
    "host_memory": check_host_memory,
    "lora_bf16": check_lora_bf16,
    "big_step": check_big_step,
    "host_syncs": check_host_syncs,
}
# Timed on an otherwise idle GPU: run after everything else has finished.
EXCLUSIVE_ON_GPU = ("big_step",)

# ``--worker NAME --spec JSON``: the probes that Context.worker starts, each in a fresh process.
WORKERS: dict[str, Callable[[dict], dict]] = {
    "backend": worker_backend,
    "te_vs_local": worker_te_vs_local,
    "write_checkpoints": worker_write_checkpoints,
    "host_memory": worker_host_memory,
    "lora_bf16": worker_lora_bf16,
    "big_step": worker_big_step,
    "host_syncs": worker_host_syncs,
}


def run_worker(name: str, spec: dict) -> int:
    from llm2clip_scale.launch import configure_rank_logging

    configure_rank_logging(0)
    result = WORKERS[name](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)
    from llm2clip_scale.distributed.topology import shutdown

    try:
        shutdown()
    except Exception as err:  # the result is out; a failing teardown must not turn it into a FAIL
        print(f"process group shutdown failed: {err}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------------------------- main


def _run_check(ctx: Context, name: str) -> Row:
    try:
        return CHECKS[name](ctx)
    except Exception as err:  # a bug in a check is that check's FAIL, not the end of the whole report
        return Row(name, "FAIL", f"the check itself raised {type(err).__name__}: {err}")


def run_checks(ctx: Context, names: list[str], report: Callable[[Row], None]) -> list[Row]:
    exclusive = [n for n in names if ctx.cuda and n in EXCLUSIVE_ON_GPU]
    shared = [n for n in names if n not in exclusive]
    rows: dict[str, Row] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, len(shared)), thread_name_prefix="check") as checks:
        futures = {checks.submit(_run_check, ctx, n): n for n in shared}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            rows[row.name] = row
            report(row)
    for name in exclusive:
        rows[name] = _run_check(ctx, name)
        report(rows[name])
    return [rows[n] for n in names]


@contextlib.contextmanager
def work_directory(keep: bool, path: str | None) -> Iterator[tuple[Path, list[bool]]]:
    """A fresh work directory; removed at the end unless asked to keep it or a check failed (``failed[0]``)."""
    work = Path(path) if path else Path(tempfile.mkdtemp(prefix="first_gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = [False]
    try:
        yield work, failed
    finally:
        if not keep and not failed[0] and not path:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter trajectories; on a CPU also no smoke runs of GPU-only checks")
    parser.add_argument("--only", default="", help="comma-separated checks to run (see --list)")
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    parser.add_argument("--jobs", type=int, default=0, help="processes at once (default: 4 on a GPU, 2 on a CPU)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per process (default: 600 GPU, 300 CPU)")
    parser.add_argument("--no-cpu-smoke", dest="cpu_smoke", action="store_false",
                        help="on a CPU, skip the tiny-scale smoke runs of GPU-only checks")
    parser.add_argument("--work-dir", default=None, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, json.loads(args.spec))
    if args.list:
        print("\n".join(CHECKS))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")

    started = time.perf_counter()
    lock = threading.Lock()
    with work_directory(args.keep, args.work_dir) as (work, failed):
        ctx = Context(args, work)
        import torch

        mode = "" if ctx.cuda else f" -- no CUDA ({ctx.cuda_why}): CPU smoke test"
        print(f"first_gpu_check: {len(names)} checks on {ctx.device_name}, torch {torch.__version__}, "
              f"{ctx.jobs} processes at a time{' (quick)' if ctx.quick else ''}{mode}", flush=True)

        def report(row: Row) -> None:
            with lock:
                print(f"[{time.perf_counter() - started:6.0f} s] {row.line()}", flush=True)

        try:
            rows = run_checks(ctx, names, report)
        finally:
            ctx.pool.shutdown(wait=True, cancel_futures=True)
        counts = collections.Counter(row.status for row in rows)
        failed[0] = counts["FAIL"] > 0
        print("\nsummary:")
        for row in rows:
            print(row.line())
        kept = args.keep or failed[0] or args.work_dir
        print(f"{len(rows)} checks: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
              f"{time.perf_counter() - started:.0f} s on {ctx.device_name}"
              + (f"; logs in {ctx.logs}" if kept else ""), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    return 1 if failed[0] else 0


if __name__ == "__main__":
    sys.exit(main())
