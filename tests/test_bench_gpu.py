"""tools/bench_gpu.py: the CPU smoke run (tiny towers, fp32) prints its table, and its TFLOP/s are the FLOP model's
per-sample FLOPs times the measured samples/s; the GPU defaults are what the tool documents. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llm2clip_scale.config import load_config
from llm2clip_scale.metrics.flops import training_flops_per_sample

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "tools" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bench_gpu
_spec.loader.exec_module(bench_gpu)


def test_cpu_smoke_run_prints_tflops_from_the_flop_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--models", "vit_e,so400m_384", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert bench_gpu.main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["command"].endswith(" ".join(argv)) and report["date"] and "CPU" in report["machine"]["device"]
    for line in ("- date: ", "- command: ", "- machine: ", "| model TFLOP/s |"):
        assert line in table
    args = bench_gpu.parse_args(argv)
    for row in report["rows"]:
        assert "error" not in row and row["finite"] and len(row["step_seconds_all"]) == 2
        overrides, shape = bench_gpu._overrides(row["model"], args, "cpu")
        cfg = load_config(REPO / "configs" / bench_gpu.MODELS[row["model"]].config, overrides)
        assert shape == {"depth": 2, "full_depth": bench_gpu.MODELS[row["model"]].full_depth, "micro_batch": 4,
                         "precision": "fp32"}
        per_sample = training_flops_per_sample(cfg, None)
        assert row["flops_per_sample"] == per_sample["model"] > per_sample["vision"] > 0
        assert row["model_tflops"] == pytest.approx(4 * per_sample["model"] / row["step_seconds"] / 1e12, rel=1e-12)
        assert row["hardware_tflops"] > row["model_tflops"]  # the checkpointed blocks run forward twice
        assert row["mfu"] is None and row["peak_tflops"] is None  # no peak for a CPU
        assert f"| {row['model']} (" in table and f"{row['model_tflops']:.4g}" in table


def test_gpu_defaults_fit_80_gb_by_the_documented_estimate() -> None:
    from llm2clip_scale.models.clip import build_clip_model

    args = bench_gpu.parse_args([])
    overrides, shape = bench_gpu._overrides("vit_e", args, "cuda")
    assert shape == {"depth": 32, "full_depth": 64, "micro_batch": 64, "precision": "bf16"}
    assert "parallel.zero_stage=0" in overrides and "parallel.backend=nccl" in overrides
    cfg = load_config(REPO / "configs" / "stage2_vit_e.yaml", overrides)
    assert cfg.model.vision.timm_kwargs == {"depth": 32} and cfg.model.vision.image_size == 224
    params = sum(p.numel() for p in build_clip_model(cfg.model, device="meta").parameters() if p.requires_grad)
    # The docstring's arithmetic: 20 bytes per trainable parameter under ZeRO-0 bf16, plus ~6 GB of activations.
    assert params == pytest.approx(2.45e9, rel=0.01) and 20 * params + 6e9 < 60e9
    full = bench_gpu._overrides("vit_e", bench_gpu.parse_args(["--depth", "full"]), "cuda")[1]
    assert full["depth"] == 64
    assert bench_gpu._overrides("so400m_384", args, "cuda")[1]["depth"] == 27
