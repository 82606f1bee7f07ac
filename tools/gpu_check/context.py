"""What the checks share: their result rows, the finished subprocesses, and the Context that builds the
prerequisites and runs every training run and probe as a subprocess."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The entry point, started again as ``--worker NAME --spec JSON`` for every in-process probe.
SCRIPT = REPO / "tools" / "first_gpu_check.py"
RESULT_TAG = "FIRST_GPU_CHECK_RESULT "
GIB = 2**30

# The tiny stage-2 vision tower of the CPU smoke runs (tests/conftest.py's TINY_VISION): 32 px, 2 blocks of width 64.
CPU_VISION = ["model.vision.image_size=32",
              "model.vision.timm_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 4}"]


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
        argv = [sys.executable, str(SCRIPT), "--worker", name, "--spec", json.dumps(spec)]
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
