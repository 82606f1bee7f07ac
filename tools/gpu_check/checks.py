"""The correctness checks (backend, fused kernels, NCCL runs of every stage, GPU vs CPU trajectories, TE vs local
spec, bf16 LoRA state): each takes the Context and returns its Row. They run on the driver's threads; the work itself
is done by the subprocesses they start."""

from __future__ import annotations

import concurrent.futures
import math
import sys
from collections.abc import Callable

from .context import REPO, Context, Proc, Row, rel, shard_pattern

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
