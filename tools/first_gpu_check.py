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
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "FIRST_GPU_CHECK_RESULT "
GIB = 2**30

# The tiny stage-2 vision tower of the CPU smoke runs (tests/conftest.py's TINY_VISION): 32 px, 2 blocks of width 64.
CPU_VISION = ["model.vision.image_size=32",
              "model.vision.timm_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 4}"]

# trajectory_fp32: both runs are fp32 on identical weights and data, so only summation order differs. Two CPU runs
# that differ only in it (1 vs 2 threads) agree to 4e-7 at every one of the 20 steps; a loss or logit scale further
# than 1e-4 (relative) from the CPU's means the GPU computes something else (a wrong mask, a stale buffer, a missed
# reduction), not the same thing in another order.
FP32_TOL = 1e-4
# trajectory_bf16: at step 1 the weights are identical and only the forward is rounded: bf16 keeps 8 mantissa bits
# (ulp 2^-8 ~ 4e-3 at 1.0), activations, weights and the adapter's output are each rounded, so the loss moves by a
# few ulps; 3e-2 (~8 ulps) bounds it. After that no ulp-based bound holds: AdamW's first updates are nearly
# lr * sign(g), and bf16 gradients flip the sign on weights whose gradient is small, so the runs separate by an
# amount set by the training dynamics (measured on CPUs: up to 4% per step at tiny_cpu.yaml's scale, while the loss
# oscillates). The scale that matters is how far training moves the loss at all: an lr=0 control run. A broken bf16
# path (updates lost to bf16 weights, a loss reduced in bf16) stays near the control, so over steps 2..N the bf16
# run must be on average within BF16_SIGNAL_FRACTION of the control's distance from the fp32 run (measured: 0.06).
BF16_TOL = 3e-2
BF16_SIGNAL_FRACTION = 0.25
# te_vs_local: TE may run fp32 GEMMs in TF32 (10-bit mantissa, ~5e-4 per product) and fuses the RMSNorm into the
# following GEMM, so fp32 agreement is TF32-level, not bitwise; in bf16, both specs round at different points, the
# same allowance as tools/check_fused_numerics.py gives fused attention (3e-2).
TE_TOL = {"float32": 2e-3, "bfloat16": 3e-2}
# host_memory: streaming holds one tensor as read from the file plus at most one converted copy; 256 MiB covers the
# CUDA context's and allocator's host bookkeeping and Python objects. Loading a whole file exceeds this by the file.
STREAM_SLACK = 256 * 2**20
# big_step: the per-rank budget of configs/stage2_vit_e.yaml's target GPUs (16 nodes x 8 x 80 GB, its header).
STAGE2_VIT_E_RANKS = 128
GPU_BUDGET_BYTES = 80e9
# host_syncs: see check_host_syncs.
SYNC_LIMIT = 48
SYNC_GROWTH = 2


@dataclass(frozen=True)
class Row:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<21} {self.detail}"


@dataclass
class Proc:
    """One finished subprocess: exit status, the worker's result dict (None without one) and where its log is."""

    name: str
    rc: int
    seconds: float
    log: Path
    result: dict | None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def error(self) -> str:
        """The last informative line of the log (the exception message, usually), and the log's path."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s (log {self.log})"
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line or "Exception" in line]
        last = (errors or lines or ["(no output)"])[-1]
        return f"exit {self.rc}: {last[:400]} (log {self.log})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard_pattern(data: Path, split: str) -> str:
    summary = json.loads((data / "dataset.json").read_text())
    return str(data / summary["splits"][split]["pattern"])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


class Context:
    """What the checks share: the device, the work directory, the prerequisites (built once, whichever check asks
    first) and the pool that runs at most ``jobs`` subprocesses at a time."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        from llm2clip_scale.distributed.backend import cuda_status

        self.args = args
        self.quick: bool = args.quick
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cuda, self.cuda_why = cuda_status()
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        cores = os.cpu_count() or 1
        self.jobs = args.jobs or (4 if self.cuda else min(2, cores))
        self.threads = max(1, cores // self.jobs)  # intra-op threads per process: the jobs share the cores
        self.pool = concurrent.futures.ThreadPoolExecutor(self.jobs, thread_name_prefix="proc")
        self._lock = threading.Lock()
        self._once: dict[str, tuple[threading.Lock, list]] = {}
        self._futures: dict[str, concurrent.futures.Future[Proc]] = {}
        self.timeout = args.timeout or (600 if self.cuda else 300)
        self.backend = "nccl" if self.cuda else "gloo"

    # ---------------------------------------------------------------------------------------------- plumbing

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for; every later (or concurrent) caller gets that value."""
        with self._lock:
            lock, box = self._once.setdefault(key, (threading.Lock(), []))
        with lock:
            if not box:
                box.append(build())
            return box[0]

    def env(self, cpu_only: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(self.threads),
            # A world of one per process; each gets its own rendezvous port, so runs can share the node.
            "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        })
        if cpu_only:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU reference computes where a CPU-only box would
        env.update(extra or {})
        return env

    def submit(self, key: str, argv: list[str], cpu_only: bool = False, env: dict[str, str] | None = None,
               timeout: float | None = None) -> concurrent.futures.Future[Proc]:
        """Run ``argv`` (memoised by ``key``) in the pool; its output goes to logs/<key>.log."""
        with self._lock:
            if key not in self._futures:
                self._futures[key] = self.pool.submit(self._run, key, argv, self.env(cpu_only, env),
                                                      timeout or self.timeout)
            return self._futures[key]

    def _run(self, key: str, argv: list[str], env: dict[str, str], timeout: float) -> Proc:
        log = self.logs / f"{key}.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            try:
                rc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
                timed_out = False
            except subprocess.TimeoutExpired:
                rc, timed_out = -9, True
        result = None
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
        return Proc(key, rc, time.perf_counter() - start, log, result, timed_out)

    def worker(self, key: str, name: str, spec: dict, cpu_only: bool = False,
               env: dict[str, str] | None = None) -> concurrent.futures.Future[Proc]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec)]
        return self.submit(key, argv, cpu_only, env)

    def train(self, key: str, config: str, overrides: list[str], cpu_only: bool = False,
              env: dict[str, str] | None = None) -> concurrent.futures.Future[Proc]:
        """``python -m llm2clip_scale train CONFIG overrides`` at world 1, logs and checkpoints under runs/<key>."""
        run_dir = self.work / "runs" / key
        argv = [sys.executable, "-m", "llm2clip_scale", "train", str(REPO / "configs" / config), *overrides,
                f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}/logs", "logging.progress_bar=false",
                "logging.tensorboard=false", "train.resume=none"]
        return self.submit(key, argv, cpu_only, env)

    def metrics(self, key: str) -> list[dict]:
        path = self.work / "runs" / key / "logs" / "metrics.jsonl"
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if "loss" in r]

    def train_result(self, proc: Proc) -> dict | None:
        path = self.work / "runs" / proc.name / "logs" / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------------------------------ prerequisites

    def data(self) -> Path:
        """Synthetic shards + tokenizer: tiny_cpu.yaml's 64 px images on a GPU node (20 steps of 64 samples fit in
        one pass), tests/conftest.py's 32 px set on the CPU."""
        def build() -> Path:
            from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset

            out = self.work / "data"
            params = (SyntheticParams(train_samples=1536, eval_samples=64, image_size=64, samples_per_shard=256)
                      if self.cuda else
                      SyntheticParams(train_samples=256, eval_samples=32, image_size=32, samples_per_shard=64, seed=1))
            build_synthetic_dataset(out, params)
            return out

        return self.once("data", build)

    def data_overrides(self) -> list[str]:
        """Point a tiny stage-2 config at the generated data; on the CPU also shrink it to tests/conftest.py's."""
        data = self.data()
        out = [f"data.train_shards={shard_pattern(data, 'train')}", f"model.llm.tokenizer={data}/tokenizer"]
        if not self.cuda:
            out += ["data.num_workers=0", "train.global_batch=16", "train.micro_batch=8", *CPU_VISION]
        return out

    def trunk_checkpoint(self) -> Path:
        """The tiny stage-2 vision trunk, drawn once on the CPU and saved in timm's layout: runs that load it start
        from the same weights on any device (a trunk built on the GPU draws its init from the CUDA generator)."""
        def build() -> Path:
            import timm
            import torch
            from safetensors.torch import save_file

            from llm2clip_scale.config import load_config
            from llm2clip_scale.models.vision.timm_tower import _timm_kwargs

            cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [] if self.cuda else CPU_VISION)
            torch.manual_seed(0)
            trunk = timm.create_model(cfg.model.vision.name, pretrained=False, num_classes=0,
                                      **_timm_kwargs(cfg.model.vision))
            path = self.work / "tiny_trunk.safetensors"
            save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
            return path

        return self.once("trunk", build)

    def reference_clip(self) -> Proc:
        """ProCLIP's teacher: a reference CLIP trained for a few steps (data_prep/train_reference_clip.py)."""
        data = self.data()
        argv = [sys.executable, str(REPO / "data_prep" / "train_reference_clip.py"), "--data", str(data), "--out",
                str(self.work / "reference_clip"), "--steps", "3", "--batch", "8", "--warmup", "1",
                "--eval-samples", "16", "--num-workers", "0"]
        return self.submit("reference_clip", argv).result()


# ------------------------------------------------------------------------------------------------------------ checks


def silent_cpu_probe() -> list[str]:
    """``auto`` with CUDA unusable must refuse whenever a variable assigns GPUs -- GPU 0 alone included, the usual
    single-GPU job -- and pick gloo only when none does. Pure logic (faked CUDA state): it runs on any node."""
    from llm2clip_scale.distributed.backend import BackendError, resolve_backend

    problems = []
    broken = (False, "probe: CUDA unusable")
    for env in ({"CUDA_VISIBLE_DEVICES": "0"}, {"SLURM_JOB_GPUS": "0"}, {"SLURM_STEP_GPUS": "0"},
                {"SLURM_GPUS_ON_NODE": "1"}):
        try:
            got = resolve_backend("auto", env, broken)
        except BackendError:
            continue
        problems.append(f"auto with {env} and CUDA unusable -> {got!r}: a silent CPU run")
    for env in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"SLURM_GPUS_ON_NODE": "0"}):
        try:
            resolve_backend("auto", env, broken)
        except BackendError as err:
            problems.append(f"auto with {env} (no GPU assigned) refuses: {err}")
    return problems


def check_backend(ctx: Context) -> Row:
    """Item 1: no silent CPU run, and a GPU run that is a GPU run throughout."""
    from llm2clip_scale.distributed.backend import BackendError, resolve_backend

    probe = silent_cpu_probe()
    if not ctx.cuda:
        try:
            got = resolve_backend("nccl")
        except BackendError:
            if probe:
                return Row("backend", "FAIL", "; ".join(probe))
            return Row("backend", "SKIP", f"needs CUDA ({ctx.cuda_why}); here resolve_backend('nccl') refuses with "
                                          "BackendError and 'auto' refuses on assigned GPUs, as designed")
        return Row("backend", "FAIL", f"CUDA unusable ({ctx.cuda_why}) but resolve_backend('nccl') returned {got!r}")
    proc = ctx.worker("backend", "backend", {}).result()
    if not proc.ok or proc.result is None:
        return Row("backend", "FAIL", proc.error())
    r = proc.result
    problems = [f"{name}: got {r[name]!r}, want {want!r}" for name, want in (
        ("auto", "nccl"), ("auto_with_slurm_gpus", "nccl"), ("process_group", "nccl"), ("topology_device", "cuda"),
        ("all_reduce_device", "cuda"), ("all_reduce_value", 1.0), ("cpu_compat_enabled", False),
        ("patched", []), ("deepspeed_accelerator", "cuda"), ("tower_device", "cuda"), ("cpu_compat_after_tower", False),
    ) if r[name] != want] + probe
    if r["rng_tracker"] == "CpuRNGStatesTracker":  # megatron's own (or TE's) tracker is right; the shim's is not
        problems.append("megatron's RNG tracker is the CPU shim's")
    detail = (f"auto -> {r['auto']}, process group {r['process_group']}, topology device {r['topology_device']}, "
              f"DeepSpeed accelerator {r['deepspeed_accelerator']}, megatron tracker {r['rng_tracker']}, "
              f"cpu_compat enabled: {r['cpu_compat_enabled']}, tiny tower on {r['tower_device']}")
    return Row("backend", "FAIL" if problems else "PASS", "; ".join(problems) if problems else detail)


def check_fused_kernels(ctx: Context) -> Row:
    if not ctx.cuda and ctx.quick:
        return Row("fused_kernels", "SKIP", f"needs CUDA ({ctx.cuda_why}); --quick: the CPU self-check is not run "
                                            "(tests/test_kernels.py runs it)")
    proc = ctx.submit("fused_kernels", [sys.executable, str(REPO / "tools" / "check_fused_numerics.py")]).result()
    text = proc.log.read_text(errors="replace")
    summary = next((line for line in reversed(text.splitlines()) if " passed" in line), "no summary line")
    if not proc.ok:
        failed = [" ".join(line.split()) for line in text.splitlines() if line.rstrip().endswith("FAIL")]
        return Row("fused_kernels", "FAIL", f"{summary}: {'; '.join(failed[:6]) or proc.error()} (log {proc.log})")
    if "fused path unavailable" in text:
        reasons = sorted({part.strip() for line in text.splitlines() if " reference: " in line
                          for part in line.split(" reference: ", 1)[1].split(";")})
        return Row("fused_kernels", "SKIP", f"no fused kernel active ({'; '.join(reasons) or ctx.cuda_why}); the "
                                            f"reference self-check ran: {summary}")
    return Row("fused_kernels", "PASS", f"check_fused_numerics.py exit 0: {summary}")


def _stage_run(ctx: Context, name: str, config: str, extra: Callable[[], list[str]]) -> Row:
    """A 2-step NCCL run of one stage at world 1 (``extra()``: its data and prerequisites); NCCL raises on any
    collective handed a host tensor."""
    if not ctx.cuda:
        return Row(name, "SKIP", f"needs CUDA for NCCL ({ctx.cuda_why})")
    try:
        overrides = extra()
    except RuntimeError as err:
        return Row(name, "FAIL", str(err))
    proc = ctx.train(name, config, [*overrides, "train.steps=2", "train.warmup_steps=1",
                                    f"parallel.backend={ctx.backend}", "eval.max_samples=64"]).result()
    result = ctx.train_result(proc)
    if not proc.ok or result is None:
        return Row(name, "FAIL", proc.error())
    losses = [r["loss"] for r in ctx.metrics(name)]
    if result.get("steps") != 2 or not all(math.isfinite(x) for x in losses) or result.get("skipped_steps"):
        return Row(name, "FAIL", f"result {result}")
    evals = {k: v for k, v in result.items() if k in ("r1_i2t", "cra", "cra_before")}
    return Row(name, "PASS", f"2 steps on NCCL, losses {[round(x, 4) for x in losses]}, eval {evals}, checkpoint "
                             f"saved, {proc.seconds:.0f} s")


def _stage2_data(ctx: Context, *extra: str) -> list[str]:
    return [*ctx.data_overrides(), f"data.eval_shards={shard_pattern(ctx.data(), 'eval')}", *extra]


def check_nccl_stage2(ctx: Context) -> Row:
    return _stage_run(ctx, "nccl_stage2", "tiny_cpu.yaml", lambda: _stage2_data(ctx))


def check_nccl_stage2_llm_lora(ctx: Context) -> Row:
    return _stage_run(ctx, "nccl_stage2_llm_lora", "tiny_cpu.yaml", lambda: _stage2_data(ctx, "model.llm.lora_rank=4"))


def check_nccl_proclip_inherit(ctx: Context) -> Row:
    def extra() -> list[str]:
        teacher = ctx.reference_clip()
        if not teacher.ok:
            raise RuntimeError(f"the reference CLIP (the teacher) did not train: {teacher.error()}")
        return _stage2_data(ctx, f"proclip.teacher_text={ctx.work}/reference_clip/text")

    return _stage_run(ctx, "nccl_proclip_inherit", "proclip_inherit_tiny.yaml", extra)


def check_nccl_llm2clip_cc(ctx: Context) -> Row:
    def extra() -> list[str]:
        data = ctx.data()
        return [f"data.train_shards={shard_pattern(data, 'train')}", f"model.llm.tokenizer={data}/tokenizer",
                f"stage1.eval_pairs={shard_pattern(data, 'eval')}"]

    return _stage_run(ctx, "nccl_llm2clip_cc", "llm2clip_cc_tiny.yaml", extra)


def _trajectory_overrides(ctx: Context) -> list[str]:
    """tiny_cpu.yaml under ZeRO-2 from a saved trunk (device-independent start), no eval: only the steps count."""
    steps = 6 if ctx.quick else 20
    trunk = ctx.trunk_checkpoint()  # first: it needs no data, so it is built while another check builds the data
    return [*ctx.data_overrides(), "data.eval_shards=null", f"train.steps={steps}", "train.warmup_steps=2",
            "parallel.zero_stage=2", f"model.vision.pretrained_path={trunk}"]


def _trajectory(ctx: Context, key: str) -> concurrent.futures.Future[Proc]:
    base = _trajectory_overrides(ctx)
    if key == "traj_cpu_fp32":
        return ctx.train(key, "tiny_cpu.yaml", [*base, "parallel.backend=gloo"], cpu_only=True)
    if key == "traj_gpu_fp32":
        # No TF32 anywhere (cuDNN convolutions default to it): the comparison is of fp32 code paths.
        return ctx.train(key, "tiny_cpu.yaml", [*base, f"parallel.backend={ctx.backend}"],
                         env={"NVIDIA_TF32_OVERRIDE": "0"})
    bf16 = [*base, "train.precision=bf16", f"parallel.backend={ctx.backend}"]
    if key == "traj_bf16":
        return ctx.train(key, "tiny_cpu.yaml", bf16, cpu_only=not ctx.cuda)
    assert key == "traj_bf16_lr0"
    return ctx.train(key, "tiny_cpu.yaml", [*bf16, "optim.lr=0.0"], cpu_only=not ctx.cuda)


def _series(ctx: Context, proc: Proc, field: str) -> list[float]:
    return [float(r[field]) for r in ctx.metrics(proc.name)]


def check_trajectory_fp32(ctx: Context) -> Row:
    if not ctx.cuda:
        return Row("trajectory_fp32", "SKIP", f"needs CUDA: GPU fp32 vs CPU fp32 ({ctx.cuda_why})")
    ref_f, gpu_f = _trajectory(ctx, "traj_cpu_fp32"), _trajectory(ctx, "traj_gpu_fp32")
    ref, gpu = ref_f.result(), gpu_f.result()
    for proc in (ref, gpu):
        if not proc.ok:
            return Row("trajectory_fp32", "FAIL", proc.error())
    ref_loss, gpu_loss = _series(ctx, ref, "loss"), _series(ctx, gpu, "loss")
    if len(ref_loss) != len(gpu_loss) or not ref_loss:
        return Row("trajectory_fp32", "FAIL", f"{len(gpu_loss)} GPU steps vs {len(ref_loss)} CPU steps logged")
    loss_err = [rel(g, c) for g, c in zip(gpu_loss, ref_loss)]
    scale_err = [rel(g, c) for g, c in zip(_series(ctx, gpu, "logit_scale"), _series(ctx, ref, "logit_scale"))]
    worst = max(range(len(loss_err)), key=loss_err.__getitem__)
    passed = max(loss_err) <= FP32_TOL and max(scale_err) <= FP32_TOL
    return Row("trajectory_fp32", "PASS" if passed else "FAIL",
               f"{len(loss_err)} steps, ZeRO-2, TF32 off: loss rel err step 1 {loss_err[0]:.1e}, max "
               f"{max(loss_err):.1e} (step {worst + 1}), logit_scale max {max(scale_err):.1e} (tol {FP32_TOL:.0e}); "
               f"final loss GPU {gpu_loss[-1]:.5f} CPU {ref_loss[-1]:.5f}")


def check_trajectory_bf16(ctx: Context) -> Row:
    futures = [_trajectory(ctx, key) for key in ("traj_cpu_fp32", "traj_bf16", "traj_bf16_lr0")]
    ref, bf16, ctrl = (f.result() for f in futures)
    for proc in (ref, bf16, ctrl):
        if not proc.ok:
            return Row("trajectory_bf16", "FAIL", proc.error())
    ref_loss, bf16_loss, ctrl_loss = (_series(ctx, p, "loss") for p in (ref, bf16, ctrl))
    if not ref_loss or not len(ref_loss) == len(bf16_loss) == len(ctrl_loss):
        return Row("trajectory_bf16", "FAIL", f"steps logged: fp32 {len(ref_loss)}, bf16 {len(bf16_loss)}, "
                                              f"lr=0 {len(ctrl_loss)}")
    err = [rel(b, r) for b, r in zip(bf16_loss, ref_loss)]
    signal = [rel(c, r) for c, r in zip(ctrl_loss, ref_loss)]
    later = slice(1, None) if len(err) > 1 else slice(None)  # steps 2..N: after the first update
    err_mean, signal_mean = (sum(x[later]) / len(x[later]) for x in (err, signal))
    finite = all(math.isfinite(x) for x in bf16_loss)
    passed = finite and err[0] <= BF16_TOL and err_mean <= BF16_SIGNAL_FRACTION * signal_mean
    where = "GPU" if ctx.cuda else "CPU"
    return Row("trajectory_bf16", "PASS" if passed else "FAIL",
               f"{len(err)} steps, ZeRO-2, {where} bf16 vs CPU fp32: loss rel err step 1 {err[0]:.1e} (tol "
               f"{BF16_TOL:.0e}); steps 2-{len(err)} mean {err_mean:.1e} (max {max(err):.1e}) vs the lr=0 control's "
               f"{signal_mean:.1e}: ratio {err_mean / max(signal_mean, 1e-12):.2g} (must be <= "
               f"{BF16_SIGNAL_FRACTION:g}); final loss bf16 {bf16_loss[-1]:.4f} fp32 {ref_loss[-1]:.4f} lr=0 "
               f"{ctrl_loss[-1]:.4f}")


def check_te_vs_local(ctx: Context) -> Row:
    if not ctx.cuda:
        return Row("te_vs_local", "SKIP", f"needs CUDA and transformer_engine ({ctx.cuda_why})")
    from llm2clip_scale.kernels import resolve

    choice = resolve("megatron_layer_spec")
    if not choice.fused:
        return Row("te_vs_local", "SKIP", f"Transformer Engine spec unavailable: {choice.reason}")
    proc = ctx.worker("te_vs_local", "te_vs_local", {"backend": ctx.backend, "spec": "transformer_engine"}).result()
    if not proc.ok or proc.result is None:
        return Row("te_vs_local", "FAIL", proc.error())
    r = proc.result
    if r.get("error"):
        return Row("te_vs_local", "FAIL", f"building the TE tower: {r['error']}")
    problems, parts = [], []
    for case in r["cases"]:
        tol = TE_TOL[case["dtype"]]
        label = f"{case['dtype']} {'bidir' if case['bidirectional'] else 'causal'}"
        parts.append(f"{label} rel {case['rel']:.1e}")
        if not case["rel"] <= tol:
            problems.append(f"{label}: rel {case['rel']:.2e} > {tol:.0e}")
        if case["control_rel"] <= 10 * tol:
            problems.append(f"{label}: a tower of another seed is only {case['control_rel']:.1e} away: the "
                            "comparison cannot tell towers apart")
    w = r["weights"]
    if w["unequal"] or w["unmapped"]:
        problems.append(f"weights differ between specs: unequal {w['unequal']}, TE names without a local twin "
                        f"{w['unmapped']}")
    detail = (f"{'; '.join(parts)} (tol fp32 {TE_TOL['float32']:.0e}, bf16 {TE_TOL['bfloat16']:.0e}; another seed: "
              f"{min(c['control_rel'] for c in r['cases']):.1e}); {w['equal']} weights bitwise equal, TE-only names "
              f"{w['te_only']} read the HF norms")
    if problems:
        return Row("te_vs_local", "FAIL", "; ".join(problems) + " | " + detail)
    return Row("te_vs_local", "PASS", detail)


def check_host_memory(ctx: Context) -> Row:
    if not ctx.cuda and (ctx.quick or not ctx.args.cpu_smoke):
        return Row("host_memory", "SKIP", f"needs CUDA: on the CPU the weights live in host memory by design "
                                          f"({ctx.cuda_why})")
    out = ctx.work / "host_memory"
    spec = ({"out": str(out), "vision_depth": 4, "llm_layers": 8, "device": "cuda"} if ctx.cuda else
            {"out": str(out), "vision_depth": 1, "llm_layers": 2, "device": "cpu", "tiny": True})
    written = ctx.worker("host_memory_write", "write_checkpoints", spec).result()
    if not written.ok or written.result is None:
        return Row("host_memory", "FAIL", f"writing the checkpoints: {written.error()}")
    proc = ctx.worker("host_memory", "host_memory", {**spec, **written.result}).result()
    shutil.rmtree(out, ignore_errors=True)  # ~6 GB of checkpoints on a GPU node
    if not proc.ok or proc.result is None:
        return Row("host_memory", "FAIL", proc.error())
    r = proc.result
    parts, problems = [], []
    for part in ("vision", "llm"):
        m = r[part]
        limit = 2 * m["largest_tensor_bytes"] + STREAM_SLACK
        parts.append(f"{m['what']}: host peak +{fmt_bytes(m['anon_growth'])} (RSS high-water +"
                     f"{fmt_bytes(m['hwm_growth'])} incl. mapped file pages) vs fp32 model "
                     f"{fmt_bytes(m['fp32_bytes'])}, limit {fmt_bytes(limit)} (2x largest tensor + 256 MiB); device "
                     f"+{fmt_bytes(m['device_growth'])}, weights {m['param_dtypes']} (1-D {m['vector_dtypes']}) on "
                     f"{m['param_devices']}")
        if m["anon_growth"] > limit:
            problems.append(f"{part}: host memory grew {fmt_bytes(m['anon_growth'])} > {fmt_bytes(limit)}")
        if ctx.cuda and (m["param_devices"] != ["cuda"] or m["param_dtypes"] != ["bfloat16"]):
            problems.append(f"{part}: weight matrices {m['param_dtypes']} on {m['param_devices']}, want bfloat16 on "
                            "cuda")
    if not ctx.cuda:
        return Row("host_memory", "SKIP", f"needs CUDA ({ctx.cuda_why}); CPU smoke run at tiny scale: {parts[0]}")
    return Row("host_memory", "FAIL" if problems else "PASS", "; ".join(problems + parts))


def check_lora_bf16(ctx: Context) -> Row:
    data = ctx.data()
    overrides = [f"data.train_shards={shard_pattern(data, 'train')}", f"model.llm.tokenizer={data}/tokenizer",
                 "stage1.eval_pairs=null", "train.precision=bf16", "train.steps=3", "train.warmup_steps=1",
                 f"parallel.backend={ctx.backend}", "optim.lr=5.0e-3"]
    if not ctx.cuda:
        overrides += ["train.global_batch=16", "train.micro_batch=4", "data.max_text_len=64"]
    run_dir = ctx.work / "runs" / "lora_bf16"
    overrides += [f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}/logs", "logging.progress_bar=false",
                  "logging.tensorboard=false", "train.resume=none"]
    proc = ctx.worker("lora_bf16", "lora_bf16", {"overrides": overrides}, cpu_only=not ctx.cuda).result()
    if not proc.ok or proc.result is None:
        return Row("lora_bf16", "FAIL", proc.error())
    r = proc.result
    device = "cuda" if ctx.cuda else "cpu"
    want = {"float32"}
    problems = []
    if set(r["base_matrix_dtypes"]) != {"bfloat16"}:
        problems.append(f"frozen base weight matrices are {r['base_matrix_dtypes']}, not bf16")
    if set(r["lora_dtypes"]) != want or set(r["lora_devices"]) != {device}:
        problems.append(f"LoRA params {r['lora_dtypes']} on {r['lora_devices']}")
    if not r["grads"] or any(set(g["dtypes"]) != want or set(g["devices"]) != {device} or g["missing"]
                             for g in r["grads"]):
        problems.append(f"LoRA grads at optimizer steps: {r['grads']}")
    if set(r["state_dtypes"]) != want or set(r["state_devices"]) != {device} or not r["state_tensors"]:
        problems.append(f"AdamW state {r['state_dtypes']} on {r['state_devices']} ({r['state_tensors']} tensors)")
    if not r["moved"] > 0 or r["applied_steps"] < 1:
        problems.append(f"LoRA did not train (moved {r['moved']}, {r['applied_steps']} steps applied)")
    # Norm weights may stay fp32 (megatron's torch-norm fallback allocates them in the default dtype): 1-D and a
    # few KB, so they are reported, not judged.
    detail = (f"{r['applied_steps']} bf16 steps of llm2clip_cc on {device}: base matrices bf16 (norm weights "
              f"{r['base_vector_dtypes']}), {r['lora_params']} LoRA params fp32, grads fp32 at {len(r['grads'])} "
              f"optimizer steps, {r['optimizer']} state fp32 ({r['state_tensors']} tensors) on {device}; losses "
              f"{r['losses']}")
    return Row("lora_bf16", "FAIL" if problems else "PASS", "; ".join(problems) if problems else detail)


def _big_step_overrides(ctx: Context) -> dict:
    """The ViT-E stage-2 config at world 1, random weights, synthetic data; on the CPU, tiny widths as well."""
    data = ctx.data()
    base = [f"data.train_shards={shard_pattern(data, 'train')}", "data.eval_shards=null",
            f"model.llm.tokenizer={data}/tokenizer", "model.llm.hf_checkpoint=null",
            "model.vision.pretrained_path=null",
            "model.llm.caption_format=plain",  # the synthetic tokenizer has no Llama-3 chat tokens
            "parallel.tensor_parallel=1", f"parallel.backend={ctx.backend}", "data.num_workers=0",
            f"checkpoint.dir={ctx.work}/runs/big_step/ckpt", f"logging.dir={ctx.work}/runs/big_step/logs"]
    if ctx.cuda:
        return {"overrides": [*base, "train.global_batch=64", "train.micro_batch=64"], "vision_kwargs": {},
                "warmup": 2, "timed": 3}
    tiny_llm = ["model.llm.hidden_size=128", "model.llm.num_attention_heads=4", "model.llm.num_query_groups=2",
                "model.llm.ffn_hidden_size=256", "model.llm.vocab_size=256", "model.adapter.input_dim=128",
                "model.embed_dim=64", "model.vision.image_size=56", "data.max_text_len=32"]
    return {"overrides": [*base, *tiny_llm, "train.global_batch=2", "train.micro_batch=2"],
            "vision_kwargs": {"embed_dim": 64, "num_heads": 4}, "warmup": 1, "timed": 1}


def check_big_step(ctx: Context) -> Row:
    if not ctx.cuda and (ctx.quick or not ctx.args.cpu_smoke):
        return Row("big_step", "SKIP", f"needs CUDA ({ctx.cuda_why}); the CPU smoke run is not done (--quick)")
    # k = 1 and k = 4 on a GPU: ViT-E blocks 2k, LLM layers k, so k = 32 is the full model (64 blocks, 32 layers).
    # Scales far apart keep the timing noise small after extrapolating 31/(k2 - k1) times the difference.
    scales = (1, 4) if ctx.cuda else (1, 2)
    spec = _big_step_overrides(ctx)
    if ctx.cuda:  # one process per scale: each peak is measured in a clean process
        procs = [ctx.worker(f"big_step_k{k}", "big_step", {**spec, "scales": [k]}).result() for k in scales]
    else:
        procs = [ctx.worker("big_step", "big_step", {**spec, "scales": list(scales)}, cpu_only=True).result()]
    for proc in procs:
        if not proc.ok or proc.result is None:
            return Row("big_step", "FAIL", proc.error())
    points = [p for proc in procs for p in proc.result["points"]]
    if not all(math.isfinite(x) for p in points for x in p["losses"]):
        return Row("big_step", "FAIL", f"non-finite loss: {[p['losses'] for p in points]}")
    (k1, a), (k2, b) = ((p["k"], p) for p in points)

    def at_full(field: str) -> float:  # linear in depth through the two measured points, at k = 32
        return a[field] + (32 - k1) * (b[field] - a[field]) / (k2 - k1)

    peak, step_s = at_full("peak_bytes"), max(at_full("step_seconds"), 1e-9)
    vision_params, llm_params = at_full("trainable_params"), at_full("llm_params")
    # configs/stage2_vit_e.yaml's layout: ZeRO-2 over 128 ranks shards the fp32 master weights and AdamW moments
    # (12 B per trainable parameter) 128 ways; TP=2 halves the LLM's bf16 weights. Gradient partitions shrink too,
    # so this is an upper estimate of what that layout needs per rank.
    per_rank = (peak - 12 * vision_params * (1 - 1 / STAGE2_VIT_E_RANKS) - 2 * llm_params * (1 - 1 / 2))
    measured = "; ".join(f"k={p['k']} (ViT-E {p['vision_depth']} blocks + LLM {p['llm_layers']} layers): peak "
                         f"{fmt_bytes(p['peak_bytes'])}, step {p['step_seconds']:.3f} s" for p in points)
    detail = (f"micro-batch {a['micro_batch']} x {a['image_size']} px, captions {a['text_len']} tokens, "
              f"layer spec {a['layer_spec']}: {measured} -> full model (64 blocks + 32 layers, "
              f"{vision_params / 1e9:.2f}B trainable + {llm_params / 1e9:.2f}B LLM) at world 1: peak "
              f"{fmt_bytes(peak)}, step {step_s:.2f} s ({a['micro_batch'] / step_s:.1f} samples/s); at 128 ranks, "
              f"ZeRO-2, TP=2: <= {fmt_bytes(per_rank)} per rank (config header: ~25 GB; budget 80 GB)")
    crashed = [p["bf16_error"] for p in points if p.get("bf16_error")]
    if crashed:
        return Row("big_step", "FAIL", f"the ViT-E config cannot take a bf16 step: {crashed[0]} (timm's EVA attention "
                                       "concatenates its fp32 k_bias buffer with the bf16 q/v biases); measured with "
                                       f"that buffer cast to bf16: {detail if ctx.cuda else measured}")
    if not ctx.cuda:
        return Row("big_step", "SKIP", f"needs CUDA: CPU smoke run at tiny widths, numbers not meaningful: {measured}")
    return Row("big_step", "PASS" if per_rank <= GPU_BUDGET_BYTES else "FAIL", detail)


def check_host_syncs(ctx: Context) -> Row:
    """Host synchronisations in one tiny stage-2 step (a single micro-batch, bf16, ZeRO-2), counted after 3 warm-up
    steps (one-off syncs: allocator growth, cuDNN autotuning), for a 4-block and a 12-block vision tower.

    The design needs a fixed handful per micro-batch and per step: the H2D copies of the batch (images, ids, masks),
    the caption-length trim, loss.item(), the loop's one all-reduced metrics read and skip count, logit scale and
    grad norm for logging, the logit-scale cap's master read, DeepSpeed's overflow check and norm -- roughly 15-25,
    whatever the model. What costs at scale is a sync per parameter tensor (a per-tensor isfinite or .item(): ~900
    tensors in ViT-E), and that grows with depth. So: the 12-block step may not sync more than SYNC_GROWTH times
    more than the 4-block one (it has ~100 more trainable tensors), and neither more than SYNC_LIMIT times."""
    if not ctx.cuda and (ctx.quick or not ctx.args.cpu_smoke):
        return Row("host_syncs", "SKIP", f"needs CUDA: torch.cuda.set_sync_debug_mode ({ctx.cuda_why})")
    window = 4
    base = [*ctx.data_overrides(), "data.eval_shards=null", f"train.steps={window + 1}", "train.warmup_steps=1",
            "parallel.zero_stage=2", "train.precision=bf16", f"parallel.backend={ctx.backend}", "checkpoint.interval=0",
            "logging.progress_bar=false", "logging.tensorboard=false", "train.resume=none"]
    depths = (4, 12) if ctx.cuda else (2,)
    futures = []
    for depth in depths:
        run_dir = ctx.work / "runs" / f"host_syncs_d{depth}"
        overrides = [*base, f"checkpoint.dir={run_dir}/ckpt", f"logging.dir={run_dir}/logs"]
        overrides += [f"model.vision.timm_kwargs={{patch_size: 8, embed_dim: 128, depth: {depth}, num_heads: 4}}",
                      "train.global_batch=32", "train.micro_batch=32"] if ctx.cuda else [
                      "train.global_batch=8", "train.micro_batch=8"]
        futures.append(ctx.worker(f"host_syncs_d{depth}", "host_syncs",
                                  {"overrides": overrides, "window": window, "count": ctx.cuda},
                                  cpu_only=not ctx.cuda))
    results = []
    for future in futures:
        proc = future.result()
        if not proc.ok or proc.result is None:
            return Row("host_syncs", "FAIL", proc.error())
        results.append(proc.result)
    if not ctx.cuda:
        return Row("host_syncs", "SKIP", f"needs CUDA ({ctx.cuda_why}); CPU smoke run of the counting step: "
                                         f"{results[0]['trainable_tensors']} trainable tensors, nothing to count")
    (shallow, deep) = results
    counts = "; ".join(f"{d} blocks ({r['trainable_tensors']} trainable tensors): {r['count']}"
                       for d, r in zip(depths, results))
    sites = ", ".join(f"{site} x{n}" for site, n in deep["sites"][:10])
    passed = deep["count"] - shallow["count"] <= SYNC_GROWTH and max(deep["count"], shallow["count"]) < SYNC_LIMIT
    return Row("host_syncs", "PASS" if passed else "FAIL",
               f"host syncs in step {window}: {counts} (limits: growth <= {SYNC_GROWTH}, each < {SYNC_LIMIT}); "
               f"12-block step by call site: {sites or 'none'}")


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


# ----------------------------------------------------------------------------------------------------------- workers
# Each runs in its own process (``--worker NAME --spec JSON``) and prints one RESULT_TAG line of JSON.


def _init(backend: str):
    from llm2clip_scale.distributed.topology import build_topology, init_distributed

    init_distributed(backend)
    return build_topology(1, 1)


def worker_backend(spec: dict) -> dict:
    import deepspeed.accelerator
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as mrandom

    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.distributed import cpu_compat
    from llm2clip_scale.distributed.backend import resolve_backend
    from llm2clip_scale.models.llm.tower import build_text_tower

    auto = resolve_backend("auto")
    auto_slurm = resolve_backend("auto", env={"SLURM_JOB_GPUS": "0"})
    topo = _init(auto)
    value = torch.ones(4, device=topo.device)
    dist.all_reduce(value)
    patched = [name for name, fake in (("torch.cuda.current_device", cpu_compat._cpu_device),
                                       ("torch.cuda.synchronize", cpu_compat._noop),
                                       ("torch.cuda.empty_cache", cpu_compat._noop))
               if getattr(torch.cuda, name.rsplit(".", 1)[1]) is fake]
    enabled_before_tower = cpu_compat.is_enabled()
    tower = build_text_tower(LLMConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                       ffn_hidden_size=128, vocab_size=128, max_seq_len=16))
    ids = torch.randint(0, 128, (2, 8), device=topo.device)
    with torch.no_grad():
        pooled = tower(ids, torch.ones_like(ids))
    return {
        "auto": auto, "auto_with_slurm_gpus": auto_slurm, "process_group": dist.get_backend(),
        "topology_device": topo.device.type, "all_reduce_device": value.device.type,
        "all_reduce_value": float(value[0]), "cpu_compat_enabled": enabled_before_tower, "patched": patched,
        "rng_tracker": type(mrandom.get_cuda_rng_tracker()).__name__,
        "deepspeed_accelerator": deepspeed.accelerator.get_accelerator().device_name(),
        "tower_device": pooled.device.type, "cpu_compat_after_tower": cpu_compat.is_enabled(),
    }


# The Transformer Engine spec fuses each pre-norm into the next linear; init_seeded reads the same HF tensor for both.
TE_NAME_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def worker_te_vs_local(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.models.llm.tower import build_text_tower

    topo = _init(spec["backend"])
    base = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=128, max_seq_len=32, seed=1234)  # tests/test_llm_tower.py's tower
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 4, 12, 1, 16])
    ids = torch.randint(0, base.vocab_size, (len(lengths), 16), generator=gen).to(topo.device)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long().to(topo.device)  # right padding, junk ids behind it
    cases, weights = [], {"equal": 0, "unequal": [], "unmapped": [], "te_only": []}
    for dtype in (torch.float32, torch.bfloat16):
        for bidirectional in (True, False):
            cfg = dataclasses.replace(base, bidirectional=bidirectional)
            local = build_text_tower(dataclasses.replace(cfg, layer_spec="local"), params_dtype=dtype)
            other = build_text_tower(dataclasses.replace(cfg, layer_spec="local", seed=cfg.seed + 1),
                                     params_dtype=dtype)
            try:
                te = build_text_tower(dataclasses.replace(cfg, layer_spec=spec["spec"]), params_dtype=dtype)
            except Exception as err:  # e.g. a TE parameter init_seeded has no HF name for: that is the finding
                return {"error": f"{type(err).__name__}: {err}"}
            if dtype == torch.float32 and bidirectional:
                local_params = dict(local.named_parameters())
                for name, param in te.named_parameters():
                    prefix, _, rest = name.partition("decoder.layers.")
                    layer, _, leaf = rest.partition(".")
                    twin = name
                    if name not in local_params and leaf in TE_NAME_TO_LOCAL:
                        twin = f"{prefix}decoder.layers.{layer}.{TE_NAME_TO_LOCAL[leaf]}"
                    if twin not in local_params:
                        weights["unmapped"].append(name)
                    elif torch.equal(param, local_params[twin]):
                        weights["equal"] += 1
                        if twin != name:
                            weights["te_only"].append(leaf)
                    else:
                        weights["unequal"].append(name)
                weights["te_only"] = sorted(set(weights["te_only"]))
            with torch.no_grad():
                want, got, far = (tower(ids, mask).float() for tower in (local, te, other))
            scale = want.abs().max().item()
            cases.append({"dtype": str(dtype).removeprefix("torch."), "bidirectional": bidirectional,
                          "rel": (got - want).abs().max().item() / scale,
                          "control_rel": (far - want).abs().max().item() / scale})
    return {"cases": cases, "weights": weights}


def _proc_status() -> dict[str, int]:
    """/proc/self/status memory fields in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


class HostPeak:
    """Peak anonymous host memory (RssAnon: heap and anonymous maps, not the page cache of mapped files) while the
    block runs, sampled every millisecond: what a rank actually holds. Copies into the GPU release the GIL, and a
    whole-file load would hold its gigabytes for far longer than a sampling period. VmHWM (the kernel's exact peak
    of all resident pages, including the checkpoint's mapped file pages) is reset at entry where the kernel allows
    and reported beside it."""

    def __enter__(self) -> HostPeak:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        status = _proc_status()
        self.base_anon, self.base_hwm = status["RssAnon"], status["VmHWM"]
        self.peak_anon = self.base_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _proc_status()["RssAnon"])
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = _proc_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.anon_growth = self.peak_anon - self.base_anon
        self.hwm_growth = status["VmHWM"] - self.base_hwm


def _llm_hf_config(spec: dict) -> dict:
    """An HF Llama config.json: Llama-3-8B's widths and RoPE, ``llm_layers`` layers (tiny widths for the CPU smoke)."""
    if spec.get("tiny"):
        widths = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                  "vocab_size": 256}
    else:
        widths = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 128256}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": spec["llm_layers"],
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", **widths}


def _vision_config(spec: dict, path: str | None):
    from llm2clip_scale.config.schema import VisionConfig

    kwargs = {"depth": spec["vision_depth"], **({"embed_dim": 64, "num_heads": 4} if spec.get("tiny") else {})}
    return VisionConfig(name="eva02_enormous_patch14_clip_224", image_size=224, timm_kwargs=kwargs,
                        pretrained_path=path)


def worker_write_checkpoints(spec: dict) -> dict:
    """A reduced ViT-E trunk in timm's layout (fp32, as timm and open_clip release it) and a reduced Llama HF
    checkpoint (bf16, as Meta releases it). The values do not matter for memory, so they are zeros: no init compute."""
    import torch
    from safetensors.torch import save_file

    from llm2clip_scale.models.llm.hf_import import expected_shapes, llm_config_from_hf
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    vision_cfg = _vision_config(spec, None)
    trunk = build_vision_tower(vision_cfg, 1024, device="meta").trunk
    tensors = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in trunk.state_dict().items()}
    vision_path = out / "vit_e_reduced.safetensors"
    save_file(tensors, str(vision_path))
    vision = {"path": str(vision_path), "largest": max(t.numel() * 4 for t in tensors.values()),
              "fp32": sum(t.numel() * 4 for t in tensors.values())}
    del tensors
    llm_dir = out / "llama_reduced"
    llm_dir.mkdir(exist_ok=True)
    (llm_dir / "config.json").write_text(json.dumps(_llm_hf_config(spec), indent=2))
    shapes = expected_shapes(llm_config_from_hf(llm_dir))
    save_file({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()},
              str(llm_dir / "model.safetensors"))
    numels = [math.prod(shape) for shape in shapes.values()]
    # load_into_tower reads gate and up together for the fused fc1, then concatenates them (two tensors' worth).
    ffn = 2 * math.prod(next(s for n, s in shapes.items() if n.endswith("gate_proj.weight")))
    llm = {"path": str(llm_dir), "largest": 2 * max(max(numels), ffn), "fp32": 4 * sum(numels)}
    return {"vision": vision, "llm": llm}


def worker_host_memory(spec: dict) -> dict:
    import torch

    from llm2clip_scale.models.llm.hf_import import llm_config_from_hf
    from llm2clip_scale.models.llm.tower import build_text_tower
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    device = torch.device(spec["device"])
    topo = _init("nccl" if device.type == "cuda" else "gloo")  # the LLM tower needs megatron's groups
    cuda = device.type == "cuda"

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def describe(module: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
        # Weight matrices carry the memory; norm weights may stay fp32 (megatron's torch-norm fallback allocates
        # them in the default dtype), so they are reported apart.
        params = list(module.parameters())
        matrices, vectors = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        return _tensor_facts(matrices)[0], _tensor_facts(vectors)[0], _tensor_facts(params)[1]

    out = {}
    before = allocated()
    with HostPeak() as peak:
        tower = build_vision_tower(_vision_config(spec, spec["vision"]["path"]), 1024, device=device,
                                   dtype=torch.bfloat16)
    dtypes, vector_dtypes, devices = describe(tower)
    out["vision"] = {"what": f"ViT-E {spec['vision_depth']} blocks", "anon_growth": peak.anon_growth,
                     "hwm_growth": peak.hwm_growth, "device_growth": allocated() - before,
                     "largest_tensor_bytes": spec["vision"]["largest"], "fp32_bytes": spec["vision"]["fp32"],
                     "param_dtypes": dtypes, "vector_dtypes": vector_dtypes, "param_devices": devices}
    del tower
    gc.collect()
    cfg = dataclasses.replace(llm_config_from_hf(spec["llm"]["path"]), layer_spec="local")
    before = allocated()
    with HostPeak() as peak:
        llm = build_text_tower(cfg, params_dtype=torch.bfloat16, device=topo.device)
    dtypes, vector_dtypes, devices = describe(llm)
    out["llm"] = {"what": f"Llama {spec['llm_layers']} layers", "anon_growth": peak.anon_growth,
                  "hwm_growth": peak.hwm_growth, "device_growth": allocated() - before,
                  "largest_tensor_bytes": spec["llm"]["largest"], "fp32_bytes": spec["llm"]["fp32"],
                  "param_dtypes": dtypes, "vector_dtypes": vector_dtypes, "param_devices": devices}
    return out


def _tensor_facts(tensors: list) -> tuple[list[str], list[str]]:
    return (sorted({str(t.dtype).removeprefix("torch.") for t in tensors}), sorted({t.device.type for t in tensors}))


def worker_lora_bf16(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.schema import Config
    from llm2clip_scale.distributed.topology import Topology
    from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask
    from llm2clip_scale.train.loop import run

    cfg = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", spec["overrides"])
    grads: list[dict] = []

    class Probe(LLM2CLIPCaptionContrastiveTask):
        """Stage 1 as the loop runs it, looking at the LoRA gradients when the optimizer consumes them (the
        trainer clears them right after)."""

        def build(self, cfg: Config, topo: Topology) -> None:
            super().build(cfg, topo)
            self.initial = [p.detach().clone() for p in self.lora.params]
            optimizer = self.lora.optimizer
            step = optimizer.step  # the scheduler's wrapper: keep it, so the lr schedule still counts steps

            def probed_step(*args: Any, **kwargs: Any) -> Any:
                present = [p.grad for p in self.lora.params if p.grad is not None]
                dtypes, devices = _tensor_facts(present)
                grads.append({"dtypes": dtypes, "devices": devices,
                              "missing": len(self.lora.params) - len(present)})
                return step(*args, **kwargs)

            optimizer.step = probed_step

    task = Probe()
    result = run(cfg, task)
    lora = task.lora.params
    lora_ids = {id(p) for p in lora}
    base = [p for p in task.tower.parameters() if id(p) not in lora_ids]
    state = [t for p in lora for t in task.lora.optimizer.state[p].values()
             if torch.is_tensor(t) and t.is_floating_point() and t.numel() == p.numel()]
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(lora, task.initial))
    losses = [round(r["loss"], 4) for r in (json.loads(line) for line in
              (Path(cfg.logging.dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    lora_dtypes, lora_devices = _tensor_facts(lora)
    state_dtypes, state_devices = _tensor_facts(state)
    return {"base_matrix_dtypes": _tensor_facts([p for p in base if p.ndim >= 2])[0],
            "base_vector_dtypes": _tensor_facts([p for p in base if p.ndim < 2])[0], "lora_dtypes": lora_dtypes,
            "lora_devices": lora_devices,
            "lora_params": sum(p.numel() for p in lora), "grads": grads, "state_dtypes": state_dtypes,
            "state_devices": state_devices, "state_tensors": len(state),
            "optimizer": type(task.lora.optimizer).__name__, "moved": moved,
            "applied_steps": result["steps"] - result["skipped_steps"], "losses": losses}


def worker_big_step(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.load import validate
    from llm2clip_scale.train.loop import seed_everything
    from llm2clip_scale.train.stage2 import Stage2Task

    points = []
    topo = None
    for k in spec["scales"]:
        kwargs = {"depth": 2 * k, **spec["vision_kwargs"]}
        inline = ", ".join(f"{key}: {value}" for key, value in kwargs.items())
        cfg = load_config(REPO / "configs" / "stage2_vit_e.yaml",
                          [*spec["overrides"], f"model.vision.timm_kwargs={{{inline}}}", f"model.llm.num_layers={k}"])
        validate(cfg, 1)
        if topo is None:
            topo = _init(cfg.parallel.backend)
        cuda = topo.device.type == "cuda"
        seed_everything(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        task = Stage2Task()
        task.build(cfg, topo)
        # The longest captions the config allows (max_text_len) and random images: a worst case for the step time.
        b, size, length = cfg.train.micro_batch, cfg.model.vision.image_size, cfg.data.max_text_len
        gen = torch.Generator().manual_seed(k)
        batch = {"images": torch.randn(b, 3, size, size, generator=gen),
                 "input_ids": torch.randint(0, cfg.model.llm.vocab_size, (b, length), generator=gen),
                 "attention_mask": torch.ones(b, length, dtype=torch.long),
                 "pool_mask": torch.ones(b, length, dtype=torch.long)}
        bf16_error = None
        try:  # the first (warm-up) step: where a dtype mix shows
            losses = [task.step([batch]).loss]
        except RuntimeError as err:  # reported as a FAIL; measured with the buffer cast, so the numbers exist too
            if "dtype" not in str(err) or not _cast_k_bias(task.engine.module):
                raise
            bf16_error, losses = f"{type(err).__name__}: {err}", []
        times = []
        for i in range(spec["warmup"] - 1 + spec["timed"]):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(task.step([batch]).loss)
            if cuda:
                torch.cuda.synchronize()
            if i >= spec["warmup"] - 1:
                times.append(time.perf_counter() - start)
        module = task.engine.module
        points.append({
            "k": k, "bf16_error": bf16_error, "vision_depth": 2 * k, "llm_layers": k, "micro_batch": b,
            "image_size": size, "text_len": length,
            "layer_spec": task.step_fn.text_tower.layer_spec, "losses": losses,
            "step_seconds": sorted(times)[len(times) // 2],
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "llm_params": sum(p.numel() for p in task.step_fn.text_tower.parameters()),
        })
        del task, module
        gc.collect()
    return {"points": points}


def _cast_k_bias(module: Any) -> list[str]:
    """timm's EVA attention builds its qkv bias as cat(q_bias, k_bias, v_bias), k_bias a zero non-persistent buffer.
    Buffers stay fp32 under bf16 (build_vision_tower, DeepSpeed), so the bias comes out fp32 and F.linear refuses it
    beside bf16 weights. Casting that zero buffer to the parameters' dtype is exact; returns the modules changed."""
    changed = []
    for name, sub in module.named_modules():
        k_bias, q_bias = sub._buffers.get("k_bias"), getattr(sub, "q_bias", None)
        if k_bias is not None and q_bias is not None and k_bias.dtype != q_bias.dtype:
            sub._buffers["k_bias"] = k_bias.to(q_bias.dtype)
            changed.append(name)
    return changed


def worker_host_syncs(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.train.loop import run
    from llm2clip_scale.train.stage2 import Stage2Task
    from llm2clip_scale.train.task import StepOutput

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", spec["overrides"])
    window, count = spec["window"], spec["count"]
    seen: dict[str, Any] = {"calls": 0, "records": None, "catcher": None, "tensors": 0}

    def start() -> None:
        seen["catcher"] = warnings.catch_warnings(record=True)
        seen["records"] = seen["catcher"].__enter__()
        warnings.simplefilter("always")  # every sync, not one per call site
        if count:
            torch.cuda.set_sync_debug_mode("warn")

    def stop() -> None:
        if count:
            torch.cuda.set_sync_debug_mode("default")
        seen["catcher"].__exit__(None, None, None)
        seen["catcher"] = None

    class Probe(Stage2Task):
        """Stage 2 as the loop runs it; counts from the start of step ``window`` to the start of the next, which
        is one whole loop iteration: the step, the loop's metric all-reduce, logging, and the next batch."""

        def step(self, micro_batches: list[dict]) -> StepOutput:
            seen["calls"] += 1
            if seen["calls"] == window + 1 and seen["catcher"] is not None:
                stop()
            if seen["calls"] == window:
                seen["tensors"] = sum(1 for p in self.engine.module.parameters() if p.requires_grad)
                start()
            return super().step(micro_batches)

    run(cfg, Probe())
    if seen["catcher"] is not None:
        stop()
    syncs = [w for w in seen["records"] or [] if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
    return {"count": len(syncs), "sites": sites.most_common(), "trainable_tensors": seen["tensors"]}


def _short(filename: str) -> str:
    """A call site relative to the repo or to site-packages."""
    for root in (str(REPO) + os.sep, "site-packages" + os.sep):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


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
