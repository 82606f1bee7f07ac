"""The FLOP model (llm2clip_scale/metrics/flops.py) against torch's FlopCounterMode on tiny real modules, the peak
table, and the loop's model_tflops/mfu recomputed by hand from a tiny online stage-2 run.

FlopCounterMode counts exactly what the model counts (matmuls, convolutions, batched matmuls; not norms, softmax or
adds), so the formulas must agree to rounding: tolerance 1e-9 relative. timm's fused attention (CPU SDPA, which the
counter does not see) is switched off so that attention runs as the two batched matmuls it is counted as.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from llm2clip_scale.config.schema import AdapterConfig, Config, LLMConfig, VisionConfig
from llm2clip_scale.metrics import flops
from tests.conftest import REPO, tiny_overrides
from tests.multiprocess import run_on_ranks

REL = 1e-9
LLM = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                vocab_size=128, max_seq_len=32, seed=7)


def _unfused(module: torch.nn.Module) -> torch.nn.Module:
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False
    return module


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


VISION = [  # (timm name, image size, constructor kwargs): plain ViT, DINOv2 (register-free), EVA02, SigLIP + MAP pool
    ("vit_tiny_patch16_224", 64, {}),
    ("vit_small_patch14_dinov2", 56, {}),
    ("eva02_tiny_patch14_224", 56, {"depth": 2}),
    ("vit_so400m_patch14_siglip_224", 56, {"embed_dim": 64, "depth": 2, "num_heads": 4}),
]


@pytest.mark.parametrize("name,size,kwargs", VISION)
def test_vision_forward_flops_match_the_flop_counter(name: str, size: int, kwargs: dict) -> None:
    formula, params, tokens = flops.vision_forward_flops(name, size, kwargs)
    model = _unfused(timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kwargs)).eval()
    assert params == sum(p.numel() for p in model.parameters())
    assert tokens == model.patch_embed.num_patches + model.num_prefix_tokens
    # Frozen rather than under no_grad: torch's module tracker trips over SigLIP's latent query under no_grad.
    measured = _counted(lambda: model.requires_grad_(False)(torch.zeros(2, 3, size, size)))
    assert formula * 2 == pytest.approx(measured, rel=REL)


def _vision_cfg(**changes) -> Config:
    cfg = Config()
    cfg.model.embed_dim = 32
    cfg.model.vision = VisionConfig(name="vit_tiny_patch16_224", image_size=64,
                                    timm_kwargs={"embed_dim": 64, "depth": 3, "num_heads": 4}, **changes)
    return cfg


@pytest.mark.parametrize("changes", [
    {},  # fully trainable: 3x the forward, less the patch embedding's input gradient
    {"grad_checkpointing": True},  # hardware adds the blocks' second forward
    {"lock": True, "lock_unlocked_groups": 1},  # backward only from the last block on
    {"lock": True},  # only the head trains: no backward through the trunk
    {"lora_rank": 4},  # frozen trunk, LoRA factors: input gradients everywhere, weight gradients of A and B
    {"patch_dropout": 0.5},  # the blocks see half the patches in training
], ids=["trainable", "checkpointing", "lock1", "lock_all", "lora", "patch_dropout"])
def test_vision_training_flops_match_the_flop_counter(changes: dict) -> None:
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    cfg = _vision_cfg(**changes)
    torch.manual_seed(0)
    tower = _unfused(build_vision_tower(cfg.model.vision, cfg.model.embed_dim)).train()
    forward, model, hardware, _ = flops._vision_tower_flops(cfg)
    images = torch.zeros(2, 3, 64, 64)
    measured = _counted(lambda: tower(images).square().sum().backward())
    assert measured == pytest.approx(2 * (hardware if changes.get("grad_checkpointing") else model), rel=REL)
    if not changes:
        patch = tower.trunk.patch_embed.proj.weight.numel() * tower.trunk.patch_embed.num_patches
        assert model == pytest.approx(3 * forward - 2 * patch, rel=REL)
    if changes.get("grad_checkpointing"):
        assert hardware > model == flops._vision_tower_flops(_vision_cfg())[1]
    per_sample = flops.training_flops_per_sample(cfg, None)
    assert per_sample["vision"] == model and per_sample["llm"] == 0.0


def test_adapter_flops_match_the_flop_counter() -> None:
    from llm2clip_scale.models.adapter import LLMAdapter

    adapter_cfg = AdapterConfig(input_dim=48, num_blocks=2, expansion=3)
    adapter = LLMAdapter(adapter_cfg, 40)
    inputs = torch.randn(5, 48)
    with torch.no_grad():
        forward = _counted(lambda: adapter(inputs))
    assert flops.adapter_forward_flops(adapter_cfg, 40) * 5 == pytest.approx(forward, rel=REL)
    # Its LayerNorms train, so even the first matmul needs its input gradient: 3x the forward.
    cfg = _vision_cfg()
    cfg.model.adapter, cfg.model.embed_dim = adapter_cfg, 40
    trained = _counted(lambda: adapter(inputs).square().sum().backward())
    assert flops.training_flops_per_sample(cfg, None)["adapter"] * 5 == pytest.approx(trained, rel=REL)


def test_peak_lookup_by_device_name() -> None:
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # the SXM part's name has no "SXM"
    assert flops.device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert flops.device_peak_tflops("NVIDIA H100 NVL", "tf32") == 417.5
    assert flops.device_peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert flops.device_peak_tflops("NVIDIA GH200 480GB", "bf16") == 989.5  # not H200's row by substring accident
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert flops.device_peak_tflops("NVIDIA A100 80GB PCIe", "tf32") == 156.0
    assert flops.device_peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert flops.device_peak_tflops("NVIDIA GB200", "bf16") == 2500.0
    assert flops.device_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert flops.device_peak_tflops("cpu", "fp32") is None
    assert flops.matmul_dtype("bf16") == "bf16"
    assert flops.matmul_dtype("fp32") in ("fp32", "tf32")


def test_llm_matmul_params_of_llama3_8b() -> None:
    llama = LLMConfig()  # the schema's defaults are Llama-3-8B's shape
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336
    assert flops.llm_matmul_params(llama) == 32 * per_layer == 6_979_321_856


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_step_flops_per_stage() -> None:
    from llm2clip_scale.config import load_config

    cpu = torch.device("cpu")
    # Stage 1: every role's captions through the LoRA tower; TP x PP ranks of a replica share the pairs.
    cfg = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", ["parallel.tensor_parallel=2",
                                                                     "train.global_batch=8"])
    lengths = {"query": [3, 5], "positive": [7, 2], "negative": [4, 4]}
    batch = {f"{role}_attention_mask": _mask(t, 9) for role, t in lengths.items()} | {"groups": [0, 1]}
    (a, b), (ha, hb) = flops._llm_coefficients(cfg.model.llm, lora=True)
    model, hardware = flops.StepFlops(cfg, 2, cpu).count(batch)
    assert model == pytest.approx(sum(a * sum(t) + b * sum(x * x for x in t) for t in lengths.values()) / 2, rel=REL)
    assert hardware == pytest.approx(sum(ha * 2 * max(t) + hb * 2 * max(t) ** 2 for t in lengths.values()) / 2,
                                     rel=REL)
    assert flops.training_flops_per_sample(cfg, 4.0)["model"] == pytest.approx(3 * (a * 4 + b * 16), rel=REL)
    # ProCLIP inheritance: the adapter (3x) per sample and the frozen LLM's forward per caption.
    cfg = load_config(REPO / "configs" / "proclip_inherit_tiny.yaml", ["train.global_batch=8"])
    model, _ = flops.StepFlops(cfg, 2, cpu).count([{"attention_mask": _mask([3, 6], 6)}] * 2)
    adapter = 3 * flops.adapter_forward_flops(cfg.model.adapter, cfg.model.embed_dim)
    assert model == pytest.approx(4 * adapter + 2 * flops.llm_forward_flops(cfg.model.llm, [3, 6]), rel=REL)
    # Offline stage 2: no LLM, whatever the batch carries.
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["data.train_embedding_shards=/sidecars/{0..7}.tar"])
    counter = flops.StepFlops(cfg, 1, cpu)
    assert counter.count([{"attention_mask": _mask([5], 5)}]) == counter.count([{}])
    assert counter.count([{}])[0] == cfg.train.global_batch * flops.training_flops_per_sample(cfg, 9.0)["model"]
    assert "mfu" not in counter.rates((1e12, 1e12), 1.0) and counter.rates((1e12, 2e12), 2.0)["model_tflops"] == 0.5


# ---------------------------------------------------------------------------------------- one spawn, two checks


def _recording_stage2():
    """Stage 2 that records the rank-local caption lengths of every step's micro-batches (what the loop counts)."""
    from llm2clip_scale.train.stage2 import Stage2Task

    class Recording(Stage2Task):
        def batches(self):
            self.lengths = []
            for batch in super().batches():
                self.lengths.append([mb["attention_mask"].sum(1).tolist() for mb in batch])
                yield batch

    return Recording()


def _llm_counts() -> dict:
    """FlopCounterMode on the megatron tower: frozen forward, and forward + backward into LoRA adapters."""
    from llm2clip_scale.models.llm.lora import apply_lora
    from llm2clip_scale.models.llm.tower import build_text_tower

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LLM.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    out: dict = {}
    frozen = build_text_tower(LLM)
    with torch.no_grad():
        out["forward"] = _counted(lambda: frozen(ids, mask))
    for name, targets in (("lora_all", ["q", "k", "v", "o", "gate", "up", "down"]), ("lora_vd", ["v", "down"])):
        tower = build_text_tower(LLM)
        apply_lora(tower, rank=4, alpha=8.0, dropout=0.0, targets=targets)
        out[name] = _counted(lambda t=tower: t(ids, mask).square().sum().backward())
    return out


def _train_and_count(overrides: list[str]) -> dict:
    """A 2-step online stage-2 run with the recording task, then the megatron tower's counts in the same process
    (megatron's parallel state is up by then: one spawn serves both checks)."""
    from llm2clip_scale.config import load_config
    from llm2clip_scale.train.loop import run

    task = _recording_stage2()
    run(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides), task)
    return {"lengths": task.lengths, "llm": _llm_counts()}


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], Config]:
    """The run's directory, its rank's result and its config."""
    from llm2clip_scale.config import load_config

    run_dir = tmp_path_factory.mktemp("flops_run")
    overrides = tiny_overrides(tiny_data, run_dir, 2, "logging.tensorboard=true", "data.eval_shards=null")
    # One rank: the spawn is the cost here, and the per-rank share (global batch / world) is checked above.
    results = run_on_ranks(_train_and_count, 1, overrides)
    return run_dir, results, load_config(REPO / "configs" / "tiny_cpu.yaml", overrides)


def test_llm_flops_match_the_flop_counter_on_the_megatron_tower(tiny_run) -> None:
    counts = tiny_run[1][0]["llm"]
    assert flops.llm_forward_flops(LLM, [11, 11, 11]) == pytest.approx(counts["forward"], rel=REL)
    for name, targets in (("lora_all", ["q", "k", "v", "o", "gate", "up", "down"]), ("lora_vd", ["v", "down"])):
        llm = dataclasses.replace(LLM, lora_rank=4, lora_targets=targets)
        (a, b), _ = flops._llm_coefficients(llm, lora=True)
        assert a * 33 + b * 3 * 11**2 == pytest.approx(counts[name], rel=REL), name


def test_loop_logs_model_tflops_from_the_flop_model(tiny_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, results, cfg = tiny_run
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    lengths = results[0]["lengths"]  # rank 0 logs, from its own batches (two micro-batches a step)
    assert len(steps) == 2 and len(lengths) >= 2
    fixed = flops.training_flops_per_sample(cfg, None)
    local = cfg.train.global_batch  # one rank
    for record, micro_batches in zip(steps, lengths):
        captions = [t for mb in micro_batches for t in mb]
        model = local * fixed["model"] + flops.llm_forward_flops(cfg.model.llm, captions)
        padded = sum(flops.llm_forward_flops(cfg.model.llm, [max(mb)] * len(mb)) for mb in micro_batches)
        seconds = cfg.train.global_batch / record["samples_per_s"]
        assert record["model_tflops"] == pytest.approx(model / seconds / 1e12, rel=1e-9)
        assert record["hardware_tflops"] == pytest.approx((local * fixed["hardware"] + padded) / seconds / 1e12,
                                                          rel=1e-9)
        assert "mfu" not in record  # a CPU has no peak to divide by
    assert padded > flops.llm_forward_flops(cfg.model.llm, [t for mb in micro_batches for t in mb])
    events = EventAccumulator(str(run_dir / "logs" / "stage2")).Reload()
    logged = {tag.split("/", 1)[1]: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]
              if tag.startswith("flops_per_sample/")}
    assert logged["vision"] == pytest.approx(fixed["vision"], rel=1e-6)  # TensorBoard stores float32
    assert logged["llm_per_caption_token"] == pytest.approx(2 * flops.llm_matmul_params(cfg.model.llm), rel=1e-6)
    assert [e.value for e in events.Scalars("train/model_tflops")] == pytest.approx(
        [r["model_tflops"] for r in steps], rel=1e-6)
