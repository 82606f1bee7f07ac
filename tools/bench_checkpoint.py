"""How long a checkpoint save stalls training: asynchronous (snapshot, write in the background) vs synchronous.

Builds the stage-2 DeepSpeed engine of a config (vision tower + adapter + AdamW state), trains a few steps on random
inputs, then saves through the project's CheckpointManager both ways, several times each, and prints a table:

- ``stall``: wall time the training loop is blocked by the save (sync: the whole save; async: the snapshot, plus
  any wait at the next step boundaries until the background write is committed);
- ``step while writing``: the mean step time while the background write runs (it shares the CPU/disk with training).

Run (one process, or under torchrun for several ranks):
    python tools/bench_checkpoint.py configs/tiny_cpu.yaml --vision-width 768 --vision-depth 12 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--vision-width", type=int, default=768, help="ViT width (768 = ViT-B)")
    parser.add_argument("--vision-depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per rank for the training steps")
    parser.add_argument("--repeats", type=int, default=3, help="saves per mode")
    parser.add_argument("--steps-between", type=int, default=6, help="training steps after each save")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    return parser.parse_args()


def main() -> None:
    args = _args()
    from llm2clip_scale.checkpoint.manager import CheckpointManager, TaskState
    from llm2clip_scale.config import load_config
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.clip import build_clip_model
    from llm2clip_scale.train.engine import build_engine

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    heads = max(args.vision_width // 64, 1)
    cfg = load_config(args.config, [
        *args.overrides, f"checkpoint.dir={root}", "checkpoint.keep_last=1", "train.precision=fp32",
        f"model.vision.timm_kwargs={{patch_size: 16, embed_dim: {args.vision_width}, depth: {args.vision_depth}, "
        f"num_heads: {heads}}}", "model.vision.image_size=224",
    ])
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    topo = build_topology(1, 1)
    cfg.train.micro_batch = args.batch
    cfg.train.global_batch = args.batch * topo.world_size
    torch.manual_seed(0)
    engine = build_engine(build_clip_model(cfg.model), cfg, topo.world_size, topo.device)
    params = sum(p.numel() for p in engine.module.parameters())
    images = torch.randn(args.batch, 3, 224, 224, device=topo.device)
    texts = torch.randn(args.batch, cfg.model.adapter.input_dim, device=topo.device)

    def train_step() -> float:
        start = time.perf_counter()
        image, text, scale, _ = engine(images, texts)
        logits = scale * image @ text.T
        labels = torch.arange(len(images), device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start

    for _ in range(3):
        train_step()
    baseline = statistics.median(train_step() for _ in range(args.steps_between))
    rows = []
    step = 0
    for asynchronous in (False, True):
        cfg.checkpoint.async_save = asynchronous
        manager = CheckpointManager(cfg, topo, "bench")
        stalls, during = [], []
        for _ in range(args.repeats):
            step += 1
            state = TaskState(engine=engine, rank={"bench": step})
            start = time.perf_counter()
            manager.save(step, state, {"step": step}, ("rank", topo.rank), block=not asynchronous)
            stall = time.perf_counter() - start
            for _ in range(args.steps_between):
                inflight = manager.in_flight
                elapsed = train_step()
                if inflight:
                    during.append(elapsed)
                start = time.perf_counter()
                manager.poll()
                stall += time.perf_counter() - start
            start = time.perf_counter()
            manager.wait()  # a save still in flight after the window would block the next one
            stall += time.perf_counter() - start
            stalls.append(stall)
        manager.close()
        rows.append(("async" if asynchronous else "sync", statistics.median(stalls),
                     statistics.mean(during) if during else baseline))
    if topo.is_main:
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        print(f"\nvision+adapter parameters: {params / 1e6:.1f} M, one checkpoint ~{size:.0f} MB, "
              f"ranks: {topo.world_size}, baseline step: {baseline * 1e3:.0f} ms")
        print(f"{'mode':<6} | {'stall per save (s)':>18} | {'step while writing (ms)':>23} | {'stall vs sync':>13}")
        print("-" * 71)
        sync_stall = rows[0][1]
        for mode, stall, step_time in rows:
            print(f"{mode:<6} | {stall:>18.3f} | {step_time * 1e3:>23.0f} | {stall / sync_stall:>12.2f}x")


if __name__ == "__main__":
    main()
