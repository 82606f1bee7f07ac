"""Resuming at another layout: the vision side at DP=1 from a DP=2 ZeRO checkpoint (DeepSpeed's universal
checkpoint), the LLM side at TP=1 from TP=2 (megatron-core dist_checkpointing).

Tolerances: the DP reshard moves fp32 values without arithmetic, so weights and AdamW moments must come back exactly.
TP=1 vs TP=2 differ only in the order of floating-point sums inside the tower's matmuls, so the continued loss
trajectory agrees to rel 1e-5 (the project's fp32 tolerance; measured ~1e-8).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm2clip_scale.config import load_config
from tests.conftest import REPO, TINY_VISION
from tests.multiprocess import run_on_ranks


def _stage2_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"data.train_shards={data}/train-{{000000..000003}}.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        *TINY_VISION,
        "data.num_workers=0",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch=16",
        "train.micro_batch=8",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _engine_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights and AdamW moments of every parameter (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in engine.module.named_parameters():
        state[f"{name}/weight"] = safe_get_full_fp32_param(param).detach().clone()
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{moment}"] = safe_get_full_optimizer_state(param, moment).detach().clone()
    return state


def _train_and_report(overrides: list[str]) -> dict:
    from llm2clip_scale.train.loop import run
    from llm2clip_scale.train.stage2 import Stage2Task

    task = Stage2Task()
    run(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides), task)
    return {"state": _engine_state(task.engine), "lr": task.engine.get_lr()}


def _load_and_report(overrides: list[str], checkpoint: str) -> dict:
    from llm2clip_scale.checkpoint.manager import CheckpointManager
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.train.loop import run, seed_everything
    from llm2clip_scale.train.stage2 import Stage2Task

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*overrides, f"train.resume={checkpoint}"])
    init_distributed("gloo")
    topo = build_topology(1, 1)
    seed_everything(cfg.train.seed)
    task = Stage2Task()
    task.build(cfg, topo)
    CheckpointManager(cfg, topo, task.name).load(Path(checkpoint), task.state(), task.data_key())
    report = {"state": _engine_state(task.engine), "lr": task.engine.get_lr()}
    report["continued"] = run(cfg, Stage2Task())  # and training goes on from there at the new size
    return report


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_vision_side_resumes_at_dp1_from_dp2(tiny_data: Path, tmp_path: Path, zero_stage: int) -> None:
    saved = run_on_ranks(_train_and_report, 2,
                         _stage2_overrides(tiny_data, tmp_path / "dp2", 3, f"parallel.zero_stage={zero_stage}"))[0]
    overrides = _stage2_overrides(tiny_data, tmp_path / "dp1", 5, f"parallel.zero_stage={zero_stage}")
    loaded = run_on_ranks(_load_and_report, 1, overrides, str(tmp_path / "dp2" / "ckpt" / "step3"))[0]
    assert saved["state"].keys() == loaded["state"].keys()
    for key, value in saved["state"].items():
        assert torch.equal(loaded["state"][key], value), key
    assert loaded["lr"] == saved["lr"]  # the schedule continues where it was
    continued = loaded["continued"]
    assert continued["resumed_from"].endswith("step3") and continued["steps"] == 5
    assert continued["skipped_steps"] == 0 and continued["final_loss"] == continued["final_loss"]


def _cc_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={data}/train-{{000000..000003}}.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        "stage1.eval_pairs=null",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.global_batch=16",
        "train.micro_batch=4",
        "data.shuffle_buffer=50",
        "checkpoint.interval=2",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _cc(overrides: list[str]) -> dict:
    from llm2clip_scale.train.llm2clip_cc import train_llm2clip_cc

    return train_llm2clip_cc(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_llm_side_resumes_at_tp1_from_tp2(tiny_data: Path, tmp_path: Path) -> None:
    # TP=2 on 2 ranks is one model replica (LLM data parallel 1); TP=1 on 1 rank is the same replica, so its data
    # stream and LoRA-dropout RNG carry over and the trajectory continues.
    run_on_ranks(_cc, 2, _cc_overrides(tiny_data, tmp_path / "tp2", "parallel.tensor_parallel=2"))
    step2 = tmp_path / "tp2" / "ckpt" / "step2"
    result = run_on_ranks(_cc, 1, _cc_overrides(tiny_data, tmp_path / "tp1", f"train.resume={step2}"))[0]
    assert result["resumed_from"] == str(step2)
    tp2, tp1 = _losses(tmp_path / "tp2"), _losses(tmp_path / "tp1")
    assert sorted(tp1) == [3, 4]
    for step in (3, 4):
        assert tp1[step] == pytest.approx(tp2[step], rel=1e-5)
