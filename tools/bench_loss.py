"""One forward+backward of each contrastive loss against open_clip's, on gloo ranks: time, added memory, equality.

    python tools/bench_loss.py [--batches 1024,4096,16384] [--dim 1024] [--rounds 3] [--world 2] [--threads 1]
        [--losses clip_openclip,infonce,infonce_tiled:1024,infonce_tiled:4096,siglip_openclip,siglip]
        [--tol 1e-5] [--timeout 3600] [--out FILE.md]

Losses (``--losses``, comma-separated; a loss's reference is added when missing):

| name | what runs | compared with |
|---|---|---|
| ``clip_openclip`` | ``open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True)`` | (reference) |
| ``infonce`` | ``build_contrastive_loss("infonce")``: gathered local-loss InfoNCE | ``clip_openclip`` |
| ``infonce_tiled:T`` | ``build_contrastive_loss("infonce_tiled", T)``: T local rows per tile | ``clip_openclip`` |
| ``siglip_openclip`` | ``open_clip.loss.SigLipLoss()`` (its default bidirectional neighbour exchange) | (reference) |
| ``siglip`` | ``build_contrastive_loss("siglip")``: ring exchange | ``siglip_openclip`` |

Work: ``--batches`` are global batches B, split evenly over ``--world`` gloo ranks (B / world local rows each); fp32
L2-normalised features of width ``--dim`` drawn from one seed (the same rows for every loss), a leaf logit scale
(1/0.07 for InfoNCE, 10 for SigLIP) and a leaf SigLIP bias (-10). One measurement is ``loss = fn(...)`` then
``loss.backward()`` on every rank, timed from a barrier to the end of backward; the slowest rank's time is reported.

Memory, per rank, the largest rank reported: every measurement runs in its own freshly forked processes (the parent
imports torch and open_clip once and never computes, so the children inherit imports but no heap). A child builds its
inputs, warms the loss up on 2 rows per rank (gloo connections, BLAS), returns freed heap to the OS (glibc
``malloc_trim``), resets the kernel's resident-set high-water mark (writes ``5`` to ``/proc/self/clear_refs``) and
reads VmRSS; after backward it reads VmHWM. Added memory = VmHWM − VmRSS: every page the forward+backward touched at
its peak — tensors, autograd's saved buffers, gloo's buffers and the inputs' ``.grad``. tracemalloc cannot see torch's
allocations and torch has no CPU allocator statistics; torch allocates CPU tensors straight from glibc (default
settings, as in training), which maps blocks above its mmap threshold (dynamic, at most 32 MB) fresh and unmaps them
on free, and serves smaller ones from its heap: at small batches the figure includes that heap's fragmentation (tens
of MB, varying between rounds), at B = 16k nearly every buffer is mapped and the figure follows the live tensors.
Where clear_refs cannot be written the tool says so in the table and measures VmHWM growth over the
mark the set-up left (an underestimate when the set-up peaked higher than the loss's baseline).

Equality: in the first round of every batch each rank saves its local loss value and the gradients of its image and
text features, the logit scale and (SigLIP) the bias; a forked checker compares each loss with its reference:
max|ours − open_clip| / max|open_clip| per tensor, the largest over ranks and tensors, must be ≤ ``--tol`` (fp32:
both sides sum the same products in different orders — blocked matmuls, tiles, reduce-scatter vs gather — whose
rounding is a few ulp of the largest terms, far below 1e-5 of the largest entry). A failure ends the tool with exit
status 1 after the table.

Rounds alternate: round r runs the losses in the listed order rotated by r, so no loss always runs first or after the
same neighbour on a loaded machine. The table gives medians, min–max over rounds and ratios against the reference's
median, with the machine, command, date and load averages: wall time (the slowest rank), CPU time (the process's
user+system seconds over the same window, the largest rank: steadier than wall time on a shared machine, where a
rank waiting in a collective for a descheduled peer costs wall time but little CPU) and added memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm2clip_scale.losses import build_contrastive_loss  # noqa: E402 - after the repository is on the path
from llm2clip_scale.metrics.host_memory import proc_status_kb, reset_peak, trim_heap  # noqa: E402

DEFAULT_LOSSES = "clip_openclip,infonce,infonce_tiled:1024,infonce_tiled:4096,siglip_openclip,siglip"
REFERENCES = {"clip_openclip": None, "siglip_openclip": None, "infonce": "clip_openclip",
              "infonce_tiled": "clip_openclip", "siglip": "siglip_openclip"}
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 1 / 0.07, 10.0, -10.0
MB = 2**20


def reference_of(name: str) -> str | None:
    base = name.split(":")[0]
    if base not in REFERENCES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(REFERENCES)} (infonce_tiled:TILE)")
    return REFERENCES[base]


def _is_siglip(name: str) -> bool:
    return name.startswith("siglip")


def _build(name: str, rank: int, world: int) -> Any:
    """The loss as fn(image, text, scale, bias) -> local loss."""
    # Imported by main() before any fork (open_clip's package import takes seconds), so this finds it in sys.modules.
    from open_clip.loss import ClipLoss, SigLipLoss

    base, _, tile = name.partition(":")
    if base == "clip_openclip":
        clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return lambda i, t, s, b: clip(i, t, s)
    if base == "siglip_openclip":
        siglip = SigLipLoss(rank=rank, world_size=world)
        return lambda i, t, s, b: siglip(i, t, s, b)
    loss = build_contrastive_loss(base, tile_size=int(tile)) if tile else build_contrastive_loss(base)
    if base == "siglip":
        return lambda i, t, s, b: loss(i, t, s, b)
    return lambda i, t, s, b: loss(i, t, s)


def _inputs(name: str, batch: int, dim: int, rank: int, world: int, seed: int) -> list[torch.Tensor]:
    local = batch // world
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)[rank * local : (rank + 1) * local].clone()
    texts = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)[rank * local : (rank + 1) * local].clone()
    siglip = _is_siglip(name)
    scale = torch.tensor(SIGLIP_SCALE if siglip else CLIP_SCALE)
    bias = torch.tensor([SIGLIP_BIAS])
    return [images.requires_grad_(True), texts.requires_grad_(True), scale.requires_grad_(True),
            bias.requires_grad_(siglip)]


def _status_kb(field: str) -> int:
    value = proc_status_kb().get(field)
    if value is None:
        raise RuntimeError(f"{field} missing from /proc/self/status")
    return value


def _worker(rank: int, task: dict[str, Any], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task["port"]))
    torch.set_num_threads(task["threads"])
    world, name = task["world"], task["loss"]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn = _build(name, rank, world)
    warm = _inputs(name, 2 * world, task["dim"], rank, world, seed=1)
    fn(*warm).backward()
    inputs = _inputs(name, task["batch"], task["dim"], rank, world, seed=0)
    del warm
    trim_heap()
    dist.barrier()
    exact = reset_peak()
    base_kb = _status_kb("VmRSS") if exact else _status_kb("VmHWM")
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = fn(*inputs)
    loss.backward()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak_kb = _status_kb("VmHWM")
    if task["save"]:
        torch.save({"loss": loss.detach(), "image": inputs[0].grad, "text": inputs[1].grad, "scale": inputs[2].grad,
                    **({"bias": inputs[3].grad} if _is_siglip(name) else {})}, Path(out_dir) / f"grads{rank}.pt")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"seconds": elapsed, "cpu_seconds": cpu, "added_mb": max(peak_kb - base_kb, 0) / 1024, "exact_peak": exact}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_forked(target: Any, nprocs: int, args: tuple, timeout: float) -> None:
    """Run target(rank, *args) in nprocs forked processes; raise if any fails or the group outlives ``timeout``."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(nprocs)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        # A rank that died leaves the others waiting in gloo: end them rather than wait for the timeout.
        if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
            for proc in procs:
                proc.kill()
            break
        time.sleep(0.05)
    for proc in procs:
        proc.join()
    codes = [p.exitcode for p in procs]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"{target.__name__}{args[:1]} failed: exit codes by rank {codes}")


def measure(task: dict[str, Any], out_dir: Path, timeout: float) -> dict[str, Any]:
    """One forward+backward of task["loss"] in fresh processes: the slowest rank's wall and CPU seconds, the largest
    rank's MB."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _run_forked(_worker, task["world"], ({**task, "port": _free_port()}, str(out_dir)), timeout)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(task["world"])]
    return {key: max(r[key] for r in ranks) for key in ("seconds", "cpu_seconds", "added_mb")} | {
        "exact_peak": all(r["exact_peak"] for r in ranks)}


def _compare(_: int, pairs: list[tuple[str, str, str, str]], world: int, result_file: str) -> None:
    """For each (loss, its dir, reference, its dir): the largest scale-relative difference over ranks and tensors."""
    errors = {}
    for name, ours_dir, ref_name, ref_dir in pairs:
        worst, worst_key = 0.0, ""
        for rank in range(world):
            ours = torch.load(Path(ours_dir) / f"grads{rank}.pt")
            ref = torch.load(Path(ref_dir) / f"grads{rank}.pt")
            for key, want in ref.items():
                got = ours[key].reshape(want.shape)
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                if err > worst or math.isnan(err):
                    worst, worst_key = err, key
        errors[name] = {"error": worst, "worst": worst_key, "reference": ref_name}
    Path(result_file).write_text(json.dumps(errors))


def check(names: list[str], run_dirs: dict[str, Path], world: int, timeout: float) -> dict[str, dict]:
    pairs = [(n, str(run_dirs[n]), ref, str(run_dirs[ref])) for n in names if (ref := reference_of(n))]
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        _run_forked(_compare, 1, (pairs, world, result.name), timeout)
        return json.loads(Path(result.name).read_text())


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def render(args: argparse.Namespace, names: list[str], results: dict, errors: dict, started: str, load_start: str,
           exact: bool) -> str:
    import open_clip

    lines = [
        f"# bench_loss: one forward+backward, {args.world} gloo ranks, fp32, d={args.dim}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`",
        f"- date: {started} (finished {datetime.datetime.now().astimezone().isoformat(timespec='seconds')})",
        f"- machine: {_machine()}; torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"python {platform.python_version()}; {args.threads} thread(s) per rank",
        f"- load average (1/5/15 min): {load_start} at start, {_load()} at end",
        f"- rounds: {args.rounds}, alternating order; medians (min–max); memory = peak resident set added over the "
        f"process baseline, per rank (largest rank){'' if exact else ' — VmHWM reset unavailable: underestimate'}",
        "",
        "| B | loss | time s | time ÷ open_clip | CPU s/rank | CPU ÷ open_clip | added MB/rank | memory ÷ open_clip "
        "| max rel. diff vs open_clip |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, per_loss in results.items():
        for name in names:
            ref = reference_of(name)
            cells = []
            for key, digits in (("seconds", 3), ("cpu_seconds", 3), ("added_mb", 1)):
                values = [r[key] for r in per_loss[name]]
                median = statistics.median(values)
                ratio = f"{median / statistics.median(r[key] for r in per_loss[ref]):.2f}" if ref else "—"
                cells += [f"{median:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})", ratio]
            err = errors[batch].get(name)
            verdict = "" if err is None else "ok" if err["error"] <= args.tol else "FAIL"
            diff = "reference" if err is None else f"{err['error']:.1e} ({err['worst'] or 'bit-identical'}) {verdict}"
            lines.append(f"| {batch} | {name} | {' | '.join(cells)} | {diff} |")
    checked = [e for per in errors.values() for e in per.values()]
    passed = sum(e["error"] <= args.tol for e in checked)
    lines += ["", f"equality checks: {passed}/{len(checked)} within {args.tol:g} (value and gradients w.r.t. image "
              "features, text features, logit scale and, for SigLIP, bias; every rank)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1024,4096,16384", help="global batches, comma-separated")
    parser.add_argument("--dim", type=int, default=1024, help="feature width")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per loss and batch (median reported)")
    parser.add_argument("--world", type=int, default=2, help="gloo ranks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--losses", default=DEFAULT_LOSSES, help="comma-separated (see the module docstring)")
    parser.add_argument("--tol", type=float, default=1e-5, help="largest scale-relative difference vs open_clip")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement before it is killed")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if any(b % args.world for b in batches):
        parser.error(f"every batch must divide evenly over --world {args.world}")
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    for name in list(names):
        ref = reference_of(name)
        if ref and ref not in names:
            names.insert(0, ref)
    import open_clip.loss  # noqa: F401 - once here, inherited by every forked rank

    started, load_start = datetime.datetime.now().astimezone().isoformat(timespec="seconds"), _load()
    results: dict[int, dict[str, list]] = {}
    errors: dict[int, dict] = {}
    exact = True
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        for batch in batches:
            results[batch] = {name: [] for name in names}
            for rnd in range(args.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for name in order:
                    task = {"loss": name, "batch": batch, "dim": args.dim, "world": args.world,
                            "threads": args.threads, "save": rnd == 0}
                    res = measure(task, Path(tmp) / f"{batch}_{name}", args.timeout)
                    exact &= res["exact_peak"]
                    results[batch][name].append(res)
                    print(f"B={batch} round {rnd} {name}: {res['seconds']:.3f} s ({res['cpu_seconds']:.3f} s CPU), "
                          f"{res['added_mb']:.0f} MB",
                          file=sys.stderr, flush=True)
                if rnd == 0:
                    errors[batch] = check(names, {n: Path(tmp) / f"{batch}_{n}" for n in names}, args.world,
                                          args.timeout)
                    for name in names:  # the saved gradients are large at B=16k; only the first round keeps them
                        for file in (Path(tmp) / f"{batch}_{name}").glob("grads*.pt"):
                            file.unlink()
    table = render(args, names, results, errors, started, load_start, exact)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if all(e["error"] <= args.tol for per in errors.values() for e in per.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
