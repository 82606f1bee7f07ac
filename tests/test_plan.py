"""``llm2clip-scale plan``: parameter counts against built models, activation memory against what autograd keeps,
the ZeRO and communication arithmetic against hand computations, and the CLI against the config headers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llm2clip_scale.cli import main
from llm2clip_scale.config.load import ConfigError, load_config
from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.plan import gpu_kind, plan
from llm2clip_scale.plan import model as shapes
from llm2clip_scale.plan.estimate import _deepspeed_memory
from tests.multiprocess import run_on_ranks

GB = 1e9
# Llama-like, with grouped queries and q/k/v biases (Qwen2), so every term of the count is exercised.
LLM = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                vocab_size=128, max_seq_len=32, qkv_bias=True, lora_rank=4, lora_targets=["q", "v", "o", "up", "down"])


# ------------------------------------------------------------------------------------------- parameter counts


LAYOUTS = ((2, 1), (1, 2))


def _llm_worker() -> list[dict]:
    """Both 2-rank layouts in one spawn (a rank's start-up costs seconds): TP = 2, then PP = 2."""
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.lora import apply_lora
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    counts = []
    for tp, pp in LAYOUTS:
        build_topology(tp, pp)
        tower = build_text_tower(dataclasses.replace(LLM, layer_spec="local"))
        base = sum(p.numel() for p in tower.parameters())
        lora = apply_lora(tower, LLM.lora_rank, targets=LLM.lora_targets)
        counts.append({"stage": parallel_state.get_pipeline_model_parallel_rank(), "base": base,
                       "lora": sum(p.numel() for p in lora)})
        parallel_state.destroy_model_parallel()
    return counts


def test_llm_shard_and_lora_counts_equal_a_built_megatron_tower() -> None:
    ranks = run_on_ranks(_llm_worker, 2)
    for (tp, pp), per_rank in zip(LAYOUTS, zip(*ranks)):
        assert sorted(rank["stage"] for rank in per_rank) == ([0, 0] if pp == 1 else [0, 1])
        for rank in per_rank:
            assert rank["base"] == shapes.llm_shard_params(LLM, tp, pp, rank["stage"])
            assert rank["lora"] == shapes.llm_lora_params(LLM, tp, pp)
    assert shapes.llm_shard_params(LLM, 2, 1, 0) < shapes.llm_shard_params(LLM) < 2 * shapes.llm_shard_params(LLM, 2)


def test_vision_and_adapter_counts_equal_built_models() -> None:
    from llm2clip_scale.models.adapter import LLMAdapter
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    locked = ["model.vision.lock=true", "model.vision.lock_unlocked_groups=1"]
    for overrides in ([], ["model.vision.lora_rank=4"], locked):
        cfg = load_config("configs/tiny_cpu.yaml", overrides)
        built = build_vision_tower(cfg.model.vision, cfg.model.embed_dim)  # real weights on the CPU
        shape = shapes.vision_shape(cfg)
        assert shape.params == sum(p.numel() for p in built.parameters())
        assert shape.trainable == sum(p.numel() for p in built.parameters() if p.requires_grad)
        # The activation rules assume a trainable trunk: a locked or LoRA trunk is reported as approximate.
        assert shape.exact == (not overrides)
    adapter = LLMAdapter(cfg.model.adapter, cfg.model.embed_dim)
    assert shapes.adapter_params(cfg.model.adapter, cfg.model.embed_dim) == sum(p.numel() for p in adapter.parameters())
    big = load_config("configs/stage2_vit_e.yaml").model
    assert shapes.adapter_params(big.adapter, big.embed_dim) == shapes.meta_adapter_params(big.adapter, big.embed_dim)


# ------------------------------------------------------------------------------------------ activation memory


def _saved_bytes(cfg, samples: int, dtype: torch.dtype) -> int:
    """Bytes of every distinct storage autograd keeps for backward (parameters excluded, the images included)."""
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    tower = build_vision_tower(cfg.model.vision, cfg.model.embed_dim, dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in tower.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.randn(samples, 3, cfg.model.vision.image_size, cfg.model.vision.image_size, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        tower(images).float().sum().backward()
    return sum(kept.values())


# The tiny config, and one/two real blocks of the two large towers at 56 px (16 patches): EVA02's post-norm block,
# SO400M's block and attention pool. Exact: the walker's rules are the tensors autograd keeps.
TOWERS = [("configs/tiny_cpu.yaml", []),
          ("configs/stage2_so400m.yaml", ["model.vision.image_size=56", "model.vision.timm_kwargs={depth: 2}"]),
          ("configs/stage2_vit_e.yaml", ["model.vision.image_size=56", "model.vision.timm_kwargs={depth: 1}"])]


@pytest.mark.parametrize("path,overrides", TOWERS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_vision_activation_formula_equals_what_autograd_keeps(path: str, overrides: list[str],
                                                              checkpointing: bool) -> None:
    cfg = load_config(path, [*overrides, "model.vision.pretrained_path=null",
                             f"model.vision.grad_checkpointing={checkpointing}"])
    shape = shapes.vision_shape(cfg)
    assert shape.exact, shape.unknown
    assert shapes.vision_activation_bytes(shape, 3, 4, checkpointing)[0] == _saved_bytes(cfg, 3, torch.float32)


def test_bf16_activations() -> None:
    """bf16 halves every kept tensor but the log-sum-exp; the CPU LayerNorm keeps its statistics in bf16 too (a GPU
    keeps them in fp32, the planner's default)."""
    cfg = load_config("configs/tiny_cpu.yaml")
    kept = shapes.vision_activation_bytes(shapes.vision_shape(cfg), 2, 2, False, stats_bytes=2)[0]
    assert kept == _saved_bytes(cfg, 2, torch.bfloat16)


def test_profiler_memory_agrees_with_the_saved_tensor_count() -> None:
    """torch's own allocation accounting: what the forward leaves allocated is the kept activations (+ the output),
    less the images allocated before it."""
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    cfg = load_config("configs/tiny_cpu.yaml")
    tower = build_vision_tower(cfg.model.vision, cfg.model.embed_dim)
    images = torch.randn(3, 3, 64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = tower(images)
    alive = sum(event.self_cpu_memory_usage for event in prof.events()) - out.numel() * 4
    expected = shapes.vision_activation_bytes(shapes.vision_shape(cfg), 3, 4, False)[0] - images.numel() * 4
    assert alive == expected


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_peak_bounds_the_tracked_peak_of_a_training_step(checkpointing: bool) -> None:
    """torch's MemTracker (allocations by kind, on the CPU too) over forward + backward of an 8-block tower: the
    plan's weights + gradients + activation peak (kept + one re-run block with checkpointing) is an upper estimate
    of the tracked peak, within 20% — it counts every gradient as present at the activation peak (in truth they
    appear as activations are freed) and leaves out the backward's transient buffers (activation gradients)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    cfg = load_config("configs/tiny_cpu.yaml", [f"model.vision.grad_checkpointing={checkpointing}",
                                                 "model.vision.timm_kwargs={patch_size: 8, embed_dim: 128, depth: 8, "
                                                 "num_heads: 4}"])
    tower = build_vision_tower(cfg.model.vision, cfg.model.embed_dim)
    tracker = MemTracker()
    tracker.track_external(tower)
    with tracker:
        tower(torch.randn(8, 3, 64, 64)).sum().backward()
    tracked = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    params = sum(p.numel() for p in tower.parameters())
    planned = 4 * params + 4 * params + shapes.vision_activation_bytes(shapes.vision_shape(cfg), 8, 4, checkpointing)[1]
    assert tracked <= planned <= 1.2 * tracked


# ------------------------------------------------------------------------------------------ ZeRO, communication


def test_zero_stages_by_hand() -> None:
    """Psi = 1000 trainable of P = 1200 held, n = 4 ranks; bf16 2/2/12 (+ fp32 step gradients), fp32 4/4/8."""
    expected = {
        0: {"weights": 2400, "gradients": 2000, "optimizer states": 12000, "fp32 gradients (step)": 4000},
        1: {"weights": 2400, "gradients": 2000, "optimizer states": 3000, "fp32 gradients (step)": 1000,
            "ZeRO buckets": 2000},
        2: {"weights": 2400, "gradients": 500, "optimizer states": 3000, "fp32 gradients (step)": 1000,
            "ZeRO buckets": 4000},
        3: {"weights": 600, "gradients": 500, "optimizer states": 3000, "fp32 gradients (step)": 1000,
            "ZeRO buckets": 4000},
    }
    for zero, terms in expected.items():
        assert _deepspeed_memory(1000, 1200, 4, zero, bf16=True) == terms
    assert _deepspeed_memory(1000, 1200, 4, 3, bf16=False) == {
        "weights": 1200, "gradients": 1000, "optimizer states": 2000, "ZeRO buckets": 8000}


def test_communication_by_hand() -> None:
    """tiny_cpu on 1 x 2 GPUs: 32 rows of 64 fp32 per rank, world 2, one micro-step; ZeRO-1 over Psi."""
    cfg = load_config("configs/tiny_cpu.yaml", ["parallel.tensor_parallel=2", "train.precision=bf16"])
    p = plan(cfg, gpu_kind("h100"), 1, 2, caption_tokens=10)
    psi = p.params["deepspeed_trainable"]
    assert p.comm_bytes["feature gathers"] == 4 * 0.5 * (2 * 32 * 64 * 4)
    assert p.comm_bytes["ZeRO-1 gradient reduce-scatter"] == 0.5 * psi * 4
    assert p.comm_bytes["ZeRO-1 parameter all-gather"] == 0.5 * psi * 2
    # 2 layers x 2 + the embedding's all-reduce, each of the group's 64 captions x 10 tokens x 128 wide in bf16.
    assert p.comm_bytes["TP all-reduces (LLM)"] == 5 * 2 * 0.5 * (64 * 10 * 128 * 2)
    assert p.comm_seconds["feature gathers"] == p.comm_bytes["feature gathers"] / 450e9  # NVLink, one node
    assert p.exposed_seconds == pytest.approx(sum(p.comm_seconds.values()), rel=1e-12)
    peak = 989.5e12
    assert p.mfu_ceiling == pytest.approx(p.flops["model"] / (peak * (p.flops["hardware"] / peak + p.exposed_seconds)))


def test_flops_are_the_flop_models_per_gpu_share(capsys: pytest.CaptureFixture) -> None:
    """FLOPs come from metrics/flops.py: per sample at --caption-tokens, x global_batch / world (overrides may
    follow the options)."""
    from llm2clip_scale.metrics.flops import training_flops_per_sample

    code, out, _ = _cli(capsys, "configs/stage2_so400m.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100",
                        "--caption-tokens", "60", "--json", "train.global_batch=16384")
    assert code == 0
    p = json.loads(out)
    per_sample = training_flops_per_sample(load_config("configs/stage2_so400m.yaml"), 60)
    assert p["layout"]["accumulation_steps"] == 2
    assert p["flops"]["model"] == pytest.approx(per_sample["model"] * 16384 / 64, rel=1e-12)
    assert p["flops"]["hardware"] == pytest.approx(per_sample["hardware"] * 16384 / 64, rel=1e-12)


# ------------------------------------------------------------------------------------------------------ CLI


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_vit_e_on_one_a100_40gb_does_not_fit(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(capsys, "configs/stage2_vit_e.yaml", "parallel.tensor_parallel=1", "--nodes", "1",
                        "--gpus-per-node", "1", "--gpu", "a100-40gb")
    assert code == 1
    assert "DOES NOT FIT" in out and "largest term: optimizer states (DeepSpeed)" in out
    assert "hint: add GPUs" in out  # ZeRO has nothing to shard over on one GPU
    # 16 of them at ZeRO-0: 16 bytes per parameter (+ the fp32 step gradients) still do not fit, ZeRO-3 would.
    code, out, _ = _cli(capsys, "configs/stage2_vit_e.yaml", "parallel.zero_stage=0", "--nodes", "2",
                        "--gpus-per-node", "8", "--gpu", "a100-40gb")
    assert code == 1 and "hint: raise parallel.zero_stage (now 0)" in out
    code, out, _ = _cli(capsys, "configs/stage2_vit_e.yaml", "parallel.zero_stage=3", "--nodes", "2",
                        "--gpus-per-node", "8", "--gpu", "a100-40gb")
    assert code == 0 and "FITS" in out


def test_vit_e_documented_layout_against_its_header(capsys: pytest.CaptureFixture) -> None:
    """configs/stage2_vit_e.yaml's header: 16 nodes x 8 x 80 GB, ZeRO-2, TP 2."""
    code, out, _ = _cli(capsys, "configs/stage2_vit_e.yaml", "--nodes", "16", "--gpus-per-node", "8", "--gpu", "h100",
                        "--json")
    assert code == 0
    p = json.loads(out)
    assert p["fits"] and p["layout"]["world"] == 128
    mem, vision = p["memory"], p["params"]["vision"]
    assert vision == pytest.approx(4.35e9, rel=2e-3)  # header: ViT-E Psi = 4.35e9
    assert p["params"]["adapter"] == pytest.approx(0.27e9, rel=0.02)
    assert mem["gradients (DeepSpeed)"] / GB == pytest.approx(0.07, abs=0.005)  # 2 Psi / 128
    assert mem["optimizer states (DeepSpeed)"] / GB == pytest.approx(0.41 + 0.03, abs=0.01)  # 12 Psi / 128
    assert mem["weights (DeepSpeed)"] / GB == pytest.approx(8.7 + 0.54, abs=0.02)
    # The header's 3.8 GB stored + ~1.5 GB recomputed; here 3.77 + 1.42 (one EVA block) + the images and norms.
    assert mem["activations: vision"] / GB == pytest.approx(3.8 + 1.5, rel=0.03)
    shape = shapes.vision_shape(load_config("configs/stage2_vit_e.yaml"))
    kept, peak = shapes.vision_activation_bytes(shape, 64, 2, True)
    outside = 64 * (shape.outside_elements * 2 + shape.outside_stats * 4 + shape.outside_fp32 * 4)
    assert kept - outside == 64 * 257 * 1792 * 2 * 64  # the header's stored block inputs, exactly
    assert (peak - kept) / GB == pytest.approx(1.5, abs=0.02)  # one EVA block: (8 x 1792 + 2 x 15360) x 2 B + 80 B
    # The header halves Llama-3-8B's 16 GB checkpoint; an embedder has no LM head (0.53B): 7.5 GB per TP rank.
    assert mem["LLM shard (frozen)"] / GB == pytest.approx((16.06 - 2 * 0.525) / 2, rel=0.01)


def test_stage1_lora_count_against_its_header() -> None:
    """configs/llm2clip_cc_llama3_8b.yaml: LoRA r=16 on all 7 projections of 32 layers, ~42M parameters."""
    llm = load_config("configs/llm2clip_cc_llama3_8b.yaml").model.llm
    assert shapes.llm_lora_params(llm) == 32 * 16 * (4096 * 2 + (4096 + 1024) * 2 + 4096 * 2 + (4096 + 14336) * 3)
    assert shapes.llm_lora_params(llm) / 1e6 == pytest.approx(42, abs=0.5)


def test_so400m_documented_layout_against_its_header(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(capsys, "configs/stage2_so400m.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu",
                        "h100", "--json")
    assert code == 0
    p = json.loads(out)
    mem = p["memory"]
    assert p["params"]["vision"] == pytest.approx(0.428e9, rel=0.01)
    # ZeRO-1 keeps bf16 gradients whole: 0.86 (SO400M) + 0.54 (adapter) GB, like the weights.
    assert mem["gradients (DeepSpeed)"] / GB == pytest.approx(0.86 + 0.54, rel=0.01)
    assert mem["optimizer states (DeepSpeed)"] / GB == pytest.approx(0.08 + 0.05, abs=0.01)
    shape = shapes.vision_shape(load_config("configs/stage2_so400m.yaml"))
    kept, peak = shapes.vision_activation_bytes(shape, 128, 2, True)
    outside = 128 * (shape.outside_elements * 2 + shape.outside_stats * 4 + shape.outside_fp32 * 4)
    assert kept - outside == 128 * 729 * 1152 * 2 * 27  # the header's 5.8 GB of block inputs, exactly
    # What the header leaves out: the images, the final norm, the attention pool's k/v (0.98 GB); and one block's
    # re-run keeps (8 x 1152 + 2 x 4304) x 2 B + 80 B per token of 128 x 729: 3.33 GB, not ~2 GB.
    assert outside / GB == pytest.approx(0.98, abs=0.01)
    assert peak - kept == 128 * 729 * ((8 * 1152 + 2 * 4304) * 2 + (4 + 16) * 4)
    assert mem["activations: vision"] == peak


def test_json_and_table_agree_and_stage1_offline_proclip_plan(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(capsys, "configs/tiny_cpu.yaml", "--nodes", "1", "--gpus-per-node", "2", "--gpu", "a100-80gb")
    assert code == 0 and "FITS" in out and "feature gathers" in out
    for path, world in (("configs/llm2clip_cc_tiny.yaml", 2), ("configs/proclip_inherit_tiny.yaml", 2),
                        ("configs/proclip_stage2_tiny.yaml", 2)):
        code, out, _ = _cli(capsys, path, "--nodes", "1", "--gpus-per-node", str(world), "--gpu", "h200", "--json")
        assert code == 0, path
        assert json.loads(out)["flops"]["model"] > 0
    offline = load_config("configs/tiny_cpu.yaml", ["data.train_embedding_shards=x"])
    p = plan(offline, gpu_kind("b200"), 1, 2)
    assert "LLM shard (frozen)" not in p.memory and "llm_shard" not in p.params


@pytest.mark.parametrize("argv,message", [
    (["--gpu", "v100"], "unknown; use one of a100-40gb, a100-80gb, h100, h200, b200"),
    (["--gpu", "h100", "--nodes", "0"], "must be >= 1"),
    (["--gpu", "h100", "--gpus-per-node", "3"], "does not divide the world size 3"),
])
def test_bad_input_is_refused_with_a_clear_error(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    args = ["--nodes", "1", "--gpus-per-node", "2", *argv]
    code, _, err = _cli(capsys, "configs/stage2_vit_e.yaml", *args)
    assert code == 2 and message in err


def test_check_layout_names_the_batch_rule() -> None:
    cfg = load_config("configs/tiny_cpu.yaml")
    with pytest.raises(ConfigError, match="not a multiple of micro_batch"):
        plan(cfg, gpu_kind("h100"), 1, 4)
