"""Stage-2 training throughput and peak memory: this project's step vs open_clip_train's step, on identical work.

    python tools/bench_train.py [--model vit_tiny_patch16_224 --image-size 224 --global-batch 64 --rounds 3
        --warmup 2 --steps 5] [--zero-stage N] [--profile DIR] [--json FILE] [dotted.config=overrides ...]

Both sides train ``build_clip_model`` of one config (``--config``, default configs/tiny_cpu.yaml, + overrides, then
the size flags): the same timm tower and adapter, built from the same seed (a sha256 of the initial weights is
checked), the same deterministic random images and offline caption embeddings per step and rank, one micro-batch per
rank, fp32, InfoNCE as local loss over features gathered with gradients, AdamW with the config's hyper-parameters on
the project's decay / no-decay split, gradient clipping, warm-up + cosine schedule, logit scale clamped at ln(100).

- ``ours``: the DeepSpeed engine of ``train/engine.py`` (the config's ZeRO stage, or ``--zero-stage``),
  ``Stage2Task.step`` (``Stage2Step`` + the task's metrics) and the one loop's per-step loss all-reduce.
- ``open_clip``: open_clip_train's ``train_one_epoch`` step (``accum_freq`` 1, no scaler): ``cosine_lr``, zero_grad,
  torch DDP around a copy of the same modules, ``ClipLoss(local_loss=True, gather_with_grad=True)``, backward,
  ``clip_grad_norm_``, ``torch.optim.AdamW`` (open_clip_train's two groups), ``logit_scale.clamp_(0, ln 100)``.

Every run is a fresh gloo world of ``--world-size`` processes forked from a fork server that only imported the
libraries; runs alternate ours, open_clip, ... for ``--rounds`` rounds, each ``--warmup`` untimed then ``--steps``
timed steps (a step's time is its slowest rank's; every step starts at a barrier). Printed: medians over all timed
steps → samples/s, process CPU seconds per step over all ranks (steadier than wall time on a shared machine), peak RSS
per rank (VmHWM over the run; and over the timed steps after resetting the mark), each minus the RSS before the model
was built, and ratios ours/open_clip. The global loss and logit scale of every step must agree within
``--tolerance`` (relative), else exit status 1. ``--profile DIR`` adds one torch.profiler run per side (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the package and tests.multiprocess, also in the ranks

from llm2clip_scale.metrics.host_memory import proc_status_kb, reset_peak  # noqa: E402 - after the path is set

SIDES = ("ours", "open_clip")
# Imported once by the fork server, so that a run's ranks start in a second instead of importing for ~20 s each.
_PRELOAD = ["__main__", "torch", "deepspeed", "open_clip_train.train", "llm2clip_scale.train.stage2",
            "llm2clip_scale.models.clip", "tests.multiprocess"]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"), help="base config (YAML)")
    add("--model", default="vit_tiny_patch16_224", help="timm model name of the vision tower")
    add("--image-size", type=int, default=224)
    add("--timm-kwargs", default="{}", help='JSON of extra timm kwargs, e.g. \'{"depth": 2}\'')
    add("--embed-dim", type=int, default=512, help="shared CLIP embedding width")
    add("--text-dim", type=int, default=1024, help="width of the precomputed caption embeddings")
    add("--adapter-blocks", type=int, default=2, help="residual MLP blocks of the adapter")
    add("--global-batch", type=int, default=64, help="samples per step over all ranks")
    add("--world-size", type=int, default=2, help="gloo ranks")
    add("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="default: the config's")
    add("--lr-warmup", type=int, default=1, help="train.warmup_steps (1: full lr from the first step)")
    add("--warmup", type=int, default=2, help="untimed steps per run")
    add("--steps", type=int, default=5, help="timed steps per run")
    add("--rounds", type=int, default=3, help="runs of each side, alternating")
    add("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    add("--tolerance", type=float, default=2e-6, help="largest relative loss / logit-scale difference")
    add("--profile", default=None, metavar="DIR", help="also profile each side; operator tables into DIR")
    add("--profile-steps", type=int, default=3)
    add("--json", default=None, help="also write the results here")
    add("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-4 train.loss=infonce_tiled")
    args = p.parse_args(argv)
    if args.global_batch % args.world_size:
        p.error("--global-batch must be a multiple of --world-size (one micro-batch per rank)")
    if min(args.steps, args.rounds, args.profile_steps, args.world_size) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --profile-steps and --world-size must be >= 1, --warmup >= 0")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    return args


def build_config(args: argparse.Namespace):
    """The config both sides train under: ``--config`` + overrides, then the size flags."""
    from llm2clip_scale.config import load_config

    cfg = load_config(args.config, args.overrides)
    m, t = cfg.model, cfg.train
    m.vision.name, m.vision.image_size, m.vision.timm_kwargs = args.model, args.image_size, json.loads(args.timm_kwargs)
    m.embed_dim, m.adapter.input_dim, m.adapter.num_blocks = args.embed_dim, args.text_dim, args.adapter_blocks
    t.global_batch, t.micro_batch = args.global_batch, args.global_batch // args.world_size
    t.steps, t.warmup_steps = args.warmup + max(args.steps, args.profile_steps), args.lr_warmup
    cfg.parallel.backend, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = "gloo", 1, 1
    if args.zero_stage is not None:
        cfg.parallel.zero_stage = args.zero_stage
    # Anything open_clip_train's step has no counterpart for would not be identical work.
    needs = {"train.precision=fp32": t.precision == "fp32", "train.loss=infonce|infonce_tiled": t.loss != "siglip",
             "model.vision.layer_decay=1 (open_clip sets one lr)": m.vision.layer_decay == 1,
             "train.self_distill_weight=0": t.self_distill_weight == 0, "no logit bias": m.logit_bias_init is None,
             "no LoRA or lock": not (m.vision.lora_rank or m.vision.lock or m.llm.lora_rank)}
    if not all(needs.values()):
        raise SystemExit("bench_train compares open_clip's InfoNCE step; the config needs: "
                         + ", ".join(need for need, ok in needs.items() if not ok))
    return cfg


def make_batch(cfg, step: int, rank: int) -> dict:
    """Rank ``rank``'s batch of step ``step``: images and offline caption embeddings, the same on both sides."""
    import torch

    gen = torch.Generator().manual_seed((cfg.train.seed * 100_003 + step) * 1_009 + rank)
    b, size = cfg.train.micro_batch, cfg.model.vision.image_size
    return {"images": torch.randn(b, 3, size, size, generator=gen),
            "llm_embeddings": torch.randn(b, cfg.model.adapter.input_dim, generator=gen)}


class _Labels:
    """torch.profiler labels, only in profiled runs (nothing is wrapped otherwise)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, name: str):
        import torch

        return torch.profiler.record_function(name) if self.on else nullcontext()

    def wrap(self, fn, name: str):
        def labelled(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return labelled if self.on else fn


class OursStep:
    """``Stage2Task.step`` as the loop calls it (engine built by ``build_engine``), then the loop's loss all-reduce."""

    def __init__(self, model, cfg, topo, label: _Labels) -> None:
        import torch

        from llm2clip_scale.losses import build_contrastive_loss
        from llm2clip_scale.train import loop, stage2
        from llm2clip_scale.train.engine import build_engine

        engine = build_engine(model, cfg, topo.world_size, topo.device)
        for name in ("forward", "backward", "step"):  # instance attributes: the library's code is untouched
            setattr(engine, name, label.wrap(getattr(engine, name), f"ours.engine.{name}"))
        stage2.clamp_logit_scale = label.wrap(stage2.clamp_logit_scale, "ours.clamp_logit_scale")
        loss_fn = label.wrap(build_contrastive_loss(cfg.train.loss, cfg.train.loss_tile_size), "ours.loss")
        # The task as Stage2Task.build leaves it, minus loader and LLM (offline mode: the batches come from here).
        task = stage2.Stage2Task()
        task.cfg, task.topo, task.engine, task.lora, task.teacher = cfg, topo, engine, None, None
        task.step_fn = stage2.Stage2Step(engine, None, topo, torch.float32, loss_fn)
        self.task, self.topo, self.label, self.agree = task, topo, label, loop._agree

    def __call__(self, batch: dict, step: int) -> float:
        out = self.task.step([batch])
        with self.label("ours.loop_all_reduce"):  # loop._train's one collective after each step, as it calls it
            _stop, loss, *_ = self.agree([0.0, out.loss, *out.terms.values(), *out.metrics.values()],
                                         self.topo.device, summed=len(out.terms) + 2)
        return loss / self.topo.world_size

    def global_loss(self, value: float) -> float:
        return value  # already the world mean

    def logit_scale(self) -> float:
        import deepspeed

        param = self.task.engine.module.logit_scale
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):  # ZeRO-3 partitions it
            return float(param.detach().max())


class OpenClipStep:
    """open_clip_train.train.train_one_epoch's step (accum_freq 1, no scaler) around the same modules under DDP."""

    def __init__(self, model, cfg, topo, label: _Labels) -> None:
        import torch
        from open_clip import ClipLoss
        from open_clip_train.scheduler import cosine_lr

        from llm2clip_scale.models.vision.param_groups import build_param_groups

        self.model = torch.nn.parallel.DistributedDataParallel(model)  # open_clip_train's arguments, minus device_ids
        o = cfg.optim
        groups = build_param_groups(model, o.weight_decay, o.lr, 1.0)  # the same decay split as ours
        params = {wd: [p for g in groups if bool(g["weight_decay"]) == wd for p in g["params"]] for wd in (0, 1)}
        self.optimizer = torch.optim.AdamW(  # as open_clip_train/main.py builds it
            [{"params": params[0], "weight_decay": 0.0}, {"params": params[1], "weight_decay": o.weight_decay}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.scheduler = cosine_lr(self.optimizer, o.lr, cfg.train.warmup_steps, cfg.train.steps)
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=topo.rank,
                             world_size=topo.world_size)  # open_clip.create_loss with --local-loss --gather-with-grad
        self.grad_clip, self.topo, self.label = o.grad_clip or None, topo, label

    def __call__(self, batch: dict, step: int) -> float:
        import torch
        from open_clip import get_input_dtype
        from open_clip_train.precision import get_autocast
        from open_clip_train.train import backward, postprocess_clip_output, unwrap_model

        label, device = self.label, self.topo.device
        self.scheduler(step)
        images = batch["images"].to(device=device, dtype=get_input_dtype("fp32"), non_blocking=True)
        texts = batch["llm_embeddings"].to(device=device, non_blocking=True)
        self.optimizer.zero_grad()
        with get_autocast("fp32", device_type=device.type)():
            with label("open_clip.forward"):
                model_out = postprocess_clip_output(self.model(images, texts))
            with label("open_clip.loss"):
                total_loss = sum(self.loss(**model_out, output_dict=True).values())
        with label("open_clip.backward"):
            backward(total_loss, None)
        with label("open_clip.clip_and_step"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, norm_type=2.0)
            self.optimizer.step()
        with torch.no_grad():
            unwrap_model(self.model).logit_scale.clamp_(0, math.log(100))
        return total_loss.item()

    def global_loss(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=self.topo.device)
        dist.all_reduce(total)
        return float(total) / self.topo.world_size

    def logit_scale(self) -> float:
        return float(self.model.module.logit_scale.detach().max())


def _proc_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MB; NaN elsewhere."""
    value = proc_status_kb().get(field)
    return math.nan if value is None else value / 1024


def _rank_main(side: str, cfg, opts: dict) -> dict:
    """One rank of one run: build, warm up, time, record losses, memory and (optionally) a profile."""
    import logging
    import warnings

    import deepspeed  # noqa: F401 - on both sides, so that the RSS baselines match
    import open_clip_train.train  # noqa: F401
    import torch
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.clip import build_clip_model
    from llm2clip_scale.train.loop import seed_everything

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notes on open_clip's and DeepSpeed's gathers
    torch.set_num_threads(opts["threads"])
    init_distributed("gloo")
    topo = build_topology(1, 1)
    baseline = _proc_mb("VmRSS")
    seed_everything(cfg.train.seed)  # as the loop does before the task builds its model
    model = build_clip_model(cfg.model, device=topo.device, dtype=torch.float32)
    params = {f"{part}_params": sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("vision", "adapter")}
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(name.encode() + param.detach().contiguous().numpy().tobytes())
    label = _Labels(bool(opts["profile"]))
    runner = (OursStep if side == "ours" else OpenClipStep)(model, cfg, topo, label)
    timed = opts["profile_steps"] if opts["profile"] else opts["steps"]
    times, cpu_times, losses, scales, peak_reset, prof, build_peak = [], [], [], [], False, None, math.nan
    for step in range(opts["warmup"] + timed):
        if step == opts["warmup"]:
            build_peak, peak_reset = _proc_mb("VmHWM"), reset_peak()  # the mark of building and warm-up
            if opts["profile"] and topo.rank == 0:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
        batch = make_batch(cfg, step, topo.rank)
        dist.barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        with label(f"{side}.step"):  # the profile counts collectives inside this label only, not the tool's own
            local = runner(batch, step)
        # Wall: the step ends when its slowest rank does. CPU: this process, all threads (gloo's too), summed.
        wall_cpu = torch.tensor([time.perf_counter() - started, time.process_time() - cpu_started], device=topo.device)
        slowest, cpu = wall_cpu.clone(), wall_cpu.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu)
        if step >= opts["warmup"]:
            times.append(float(slowest[0]))
            cpu_times.append(float(cpu[1]))
        losses.append(runner.global_loss(local))
        scales.append(runner.logit_scale())
    peak = _proc_mb("VmHWM")
    result = {"params": params, "times": times, "cpu_times": cpu_times, "losses": losses, "scales": scales,
              "init_sha256": digest.hexdigest(), "baseline_mb": baseline,
              "peak_mb": max(peak, build_peak) if peak_reset else peak,
              "step_peak_mb": peak if peak_reset else math.nan}
    if prof is not None:
        prof.__exit__(None, None, None)
        result["profile"] = _profile_summary(prof, side, timed, opts["profile"])
    return result


def _profile_summary(prof, side: str, steps: int, out_dir: str) -> dict:
    events = prof.key_averages()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table = events.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70)
    (Path(out_dir) / f"{side}_rank0.txt").write_text(table + "\n")
    comms: dict[str, float] = {}
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and parent.name != f"{side}.step":
            parent = parent.cpu_parent
        if parent is not None and event.name.startswith("c10d::"):
            comms[event.name] = comms.get(event.name, 0) + 1 / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"phases_ms": {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key.startswith(side + ".")},
            "collectives_per_step": comms, "top_self_ms": [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in top]}


def compare_trajectories(ours: list[float], reference: list[float], tolerance: float) -> tuple[bool, float]:
    """(within ``tolerance`` relative at every step, largest relative difference); differing lengths never match."""
    if len(ours) != len(reference) or not ours:
        return False, math.inf
    worst = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(ours, reference, strict=True))
    return worst <= tolerance, worst


def run_world(world: int, side: str, cfg, opts: dict) -> list[dict]:
    """One run in a fresh world: ``world`` new processes forked from the fork server (which only imported modules,
    so no run inherits another's state), each through tests.multiprocess's rank entry; results by rank."""
    import multiprocessing
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    from tests.multiprocess import _entry, _free_port

    multiprocessing.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = mp.start_processes(_entry, args=(world, _free_port(), out_dir, _rank_main, (side, cfg, opts)),
                                   nprocs=world, join=False, start_method="forkserver")
        try:
            while not ranks.join():
                pass
        except BaseException:  # a dead rank, Ctrl-C or SIGTERM (see main): no rank may outlive the tool
            for proc in ranks.processes:
                if proc.is_alive():
                    proc.kill()
            raise
        payloads = [pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes()) for rank in range(world)]
    errors = [f"rank {rank} failed:\n{value}" for rank, (status, value) in enumerate(payloads) if status == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [value for _, value in payloads]


def _git() -> str:
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" + uncommitted changes" if dirty else "")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    cfg = build_config(args)
    opts = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "profile": None,
            "profile_steps": args.profile_steps}
    load_start = os.getloadavg()
    runs: dict[str, list[list[dict]]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:  # alternating, so drifting machine load hits both sides alike
            runs[side].append(run_world(args.world_size, side, cfg, opts))
    load_end = os.getloadavg()
    profiles = {side: run_world(args.world_size, side, cfg, {**opts, "profile": args.profile})[0]["profile"]
                for side in (SIDES if args.profile else ())}
    rows = {}
    for side in SIDES:
        times = [t for ranks in runs[side] for t in ranks[0]["times"]]
        per_rank = [r for ranks in runs[side] for r in ranks]
        rows[side] = {
            "median_step_s": statistics.median(times), "samples_per_s": args.global_batch / statistics.median(times),
            "step_s": times, "round_medians_s": [statistics.median(ranks[0]["times"]) for ranks in runs[side]],
            "cpu_s_per_step": statistics.median(t for ranks in runs[side] for t in ranks[0]["cpu_times"]),
            "peak_mb": max(r["peak_mb"] for r in per_rank),
            "added_mb": max(r["peak_mb"] - r["baseline_mb"] for r in per_rank),
            "step_added_mb": max(r["step_peak_mb"] - r["baseline_mb"] for r in per_rank),
        }
    first = {side: runs[side][0][0] for side in SIDES}
    loss_ok, loss_diff = compare_trajectories(first["ours"]["losses"], first["open_clip"]["losses"], args.tolerance)
    scale_ok, scale_diff = compare_trajectories(first["ours"]["scales"], first["open_clip"]["scales"], args.tolerance)
    same_init = len({r["init_sha256"] for side in SIDES for ranks in runs[side] for r in ranks}) == 1
    repeat = max(compare_trajectories(ranks[0]["losses"], first[side]["losses"], 0)[1]
                 for side in SIDES for ranks in runs[side])
    w = {"model": args.model, "image_size": args.image_size, "timm_kwargs": cfg.model.vision.timm_kwargs,
         **first["ours"]["params"], "text_dim": args.text_dim, "adapter_blocks": args.adapter_blocks,
         "embed_dim": args.embed_dim, "global_batch": args.global_batch, "world_size": args.world_size,
         "zero_stage": cfg.parallel.zero_stage, "loss": cfg.train.loss, "lr": cfg.optim.lr,
         "betas": list(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay,
         "grad_clip": cfg.optim.grad_clip, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds}
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]), "git": _git(), "load_start": load_start,
        "load_end": load_end, "threads": args.threads, "work": w, "rows": rows, "profiles": profiles,
        "versions": {name: version(name) for name in ("torch", "deepspeed", "open_clip_torch", "timm")},
        "tolerance": args.tolerance, "losses": {s: first[s]["losses"] for s in SIDES},
        "scales": {s: first[s]["scales"] for s in SIDES}, "loss_max_rel_diff": loss_diff,
        "scale_max_rel_diff": scale_diff, "rounds_max_rel_diff": repeat, "same_init": same_init,
        "trajectories_match": loss_ok and scale_ok and same_init,
    }


def format_table(r: dict) -> str:
    w, ref = r["work"], r["rows"]["open_clip"]
    kw = f" {json.dumps(w['timm_kwargs'])}" if w["timm_kwargs"] else ""
    lines = [
        f"stage-2 training step, ours (DeepSpeed ZeRO-{w['zero_stage']}, {w['loss']}) vs open_clip_train "
        "(torch DDP, ClipLoss local_loss + gather_with_grad), identical work",
        f"machine: {r['machine']}; load average (1 min) {r['load_start'][0]:.2f} at start, {r['load_end'][0]:.2f} "
        "after the timed runs",
        f"command: {r['command']}",
        f"date: {r['date']}; code {r['git']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"work: {w['model']}{kw} at {w['image_size']}px ({w['vision_params'] / 1e6:.2f}M params) + adapter "
        f"{w['text_dim']} -> {w['adapter_blocks']} blocks -> {w['embed_dim']} ({w['adapter_params'] / 1e6:.2f}M), "
        f"global batch {w['global_batch']} on {w['world_size']} gloo ranks, fp32, AdamW lr {w['lr']:g} betas "
        f"{tuple(w['betas'])} eps {w['eps']:g} wd {w['weight_decay']:g}, clip {w['grad_clip']:g}; "
        f"{w['rounds']} rounds x {w['steps']} timed steps after {w['warmup']} warm-up, {r['threads']} thread(s)/rank",
        "",
        "| trainer | median step s | samples/s | throughput ours/open_clip | peak RSS/rank MB | added MB "
        "| timed-steps peak added MB | memory ours/open_clip | CPU s/step (all ranks) | CPU ours/open_clip |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, row in r["rows"].items():
        lines.append(
            f"| {side} | {row['median_step_s']:.3f} | {row['samples_per_s']:.1f} | "
            f"{row['samples_per_s'] / ref['samples_per_s']:.2f}x | {row['peak_mb']:.0f} | {row['added_mb']:.0f} | "
            f"{row['step_added_mb']:.0f} | {row['added_mb'] / ref['added_mb']:.2f}x | {row['cpu_s_per_step']:.3f} | "
            f"{row['cpu_s_per_step'] / ref['cpu_s_per_step']:.2f}x |")
    lines += ["", f"trajectories {'MATCH' if r['trajectories_match'] else 'DIFFER'} over {len(r['losses']['ours'])} "
                  f"steps (tolerance {r['tolerance']:.0e} relative): loss max diff {r['loss_max_rel_diff']:.1e}, "
                  f"logit scale {r['scale_max_rel_diff']:.1e}; initial weights "
                  f"{'identical' if r['same_init'] else 'DIFFERENT'} on every rank and run; rounds repeat to "
                  f"{r['rounds_max_rel_diff']:.1e}"]
    lines += [f"losses {side}: " + " ".join(f"{x:.6f}" for x in r["losses"][side]) for side in SIDES]
    for side, prof in r["profiles"].items():
        lines.append(f"profile {side} (rank 0, ms/step): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in sorted(prof["phases_ms"].items()))
                     + "; collectives/step " + ", ".join(f"{k} {v:g}" for k, v in prof["collectives_per_step"].items())
                     + "; top self: " + ", ".join(f"{k} {v:.1f}" for k, v in prof["top_self_ms"][:6]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_world, which ends the ranks
    result = run(args)
    print(format_table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["trajectories_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
