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
from tests.conftest import REPO, tiny_overrides
from tests.multiprocess import run_on_ranks


def _stage2_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return tiny_overrides(data, run_dir, steps, "data.eval_shards=null", *extra)


def _train(overrides: list[str]) -> dict:
    from llm2clip_scale.train.stage2 import train_stage2

    return train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))


def _load_save_and_continue(overrides: list[str], checkpoint: str, step: int) -> dict:
    """At world 1: load the world-2 checkpoint, save it again unchanged as this run's step ``step``, continue."""
    import dataclasses

    from llm2clip_scale.checkpoint.manager import CheckpointManager
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.train.loop import LoopState, run, seed_everything
    from llm2clip_scale.train.stage2 import Stage2Task

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*overrides, f"train.resume={checkpoint}"])
    init_distributed("gloo")
    topo = build_topology(1, 1)
    seed_everything(cfg.train.seed)
    task = Stage2Task()
    task.build(cfg, topo)
    manager = CheckpointManager(cfg, topo, task.name)
    restored = manager.load(Path(checkpoint), task.state(), task.data_key())
    manager.save(step, task.state(), dataclasses.asdict(LoopState(**restored.loop)), task.data_key(), block=True)
    manager.close()
    return run(cfg, Stage2Task())  # and training goes on from there at the new size


def _universal_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every per-parameter fp32 weight and AdamW moment of a DeepSpeed universal checkpoint."""
    tensors = {}
    for path in sorted((folder / "zero").rglob("*.pt")):
        value = torch.load(path, map_location="cpu", weights_only=False)
        items = value.items() if isinstance(value, dict) else [("", value)]
        tensors.update({f"{path.relative_to(folder)}:{k}": v for k, v in items if isinstance(v, torch.Tensor)})
    return tensors


@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-1 takes ZeRO-2's universal path; ZeRO-3 partitions weights too
def test_vision_side_resumes_at_dp1_from_dp2(tiny_data: Path, tmp_path: Path, zero_stage: int) -> None:
    from llm2clip_scale.checkpoint.reshard import _convert_to_universal

    run_on_ranks(_train, 2, _stage2_overrides(tiny_data, tmp_path / "dp2", 3, f"parallel.zero_stage={zero_stage}"))
    saved = tmp_path / "dp2" / "ckpt" / "step3"
    overrides = _stage2_overrides(tiny_data, tmp_path / "dp1", 5, f"parallel.zero_stage={zero_stage}")
    continued = run_on_ranks(_load_save_and_continue, 1, overrides, str(saved), 3)[0]
    # The world-2 checkpoint (partitions of 2 ranks) and its reload saved again by 1 rank hold the same full
    # weights and AdamW moments, parameter by parameter (both in DeepSpeed's own universal form).
    resaved = tmp_path / "dp1" / "ckpt" / "step3" / "vision"
    _convert_to_universal(resaved, tmp_path / "resaved_universal")
    original, reloaded = _universal_tensors(saved / "vision_universal"), _universal_tensors(
        tmp_path / "resaved_universal")
    assert original and original.keys() == reloaded.keys()
    assert any("exp_avg_sq" in key for key in original)
    for key, value in original.items():
        assert torch.equal(reloaded[key], value), key
    assert continued["resumed_from"].endswith("step3") and continued["steps"] == 5
    assert continued["skipped_steps"] == 0 and continued["final_loss"] == continued["final_loss"]


def _cc_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(data, run_dir, 4, "stage1.eval_pairs=null", "train.micro_batch=4", "data.shuffle_buffer=50",
                          "checkpoint.interval=2", *extra)


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
