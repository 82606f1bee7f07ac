"""The checks of what the full-size model costs: host memory while loading checkpoints, the ViT-E step's GPU
memory and time, host synchronisations per training step. Like checks.py's, each returns its Row."""

from __future__ import annotations

import math
import shutil

from .context import Context, Row, fmt_bytes, shard_pattern

# host_memory: streaming holds one tensor as read from the file plus at most one converted copy; 256 MiB covers the
# CUDA context's and allocator's host bookkeeping and Python objects. Loading a whole file exceeds this by the file.
STREAM_SLACK = 256 * 2**20
# big_step: the per-rank budget of configs/stage2_vit_e.yaml's target GPUs (16 nodes x 8 x 80 GB, its header).
STAGE2_VIT_E_RANKS = 128
GPU_BUDGET_BYTES = 80e9
# host_syncs: see check_host_syncs.
SYNC_LIMIT = 48
SYNC_GROWTH = 2


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
