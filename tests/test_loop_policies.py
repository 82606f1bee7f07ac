"""The loop's policies on 2 gloo ranks: a non-finite step is skipped without touching weights, optimizer or
schedule, K in a row stop the run; a SIGKILL in the middle of a save leaves the previous checkpoint as ``latest``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2clip_scale.config import load_config
from tests.conftest import REPO, tiny_overrides
from tests.multiprocess import run_on_ranks


def _overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return tiny_overrides(data, run_dir, steps, "checkpoint.interval=1", "checkpoint.keep_last=0", *extra)


def _stage2_with_nan_steps(overrides: list[str], nan_steps: list[int]) -> dict:
    """Stage 2 whose loss is NaN on rank 0 only at ``nan_steps`` (one micro-batch per step here)."""
    import torch.distributed as dist

    import llm2clip_scale.train.stage2 as stage2

    build = stage2.build_contrastive_loss
    calls = {"step": 0}

    def poisoned_build(*args, **kwargs):
        loss_fn = build(*args, **kwargs)

        def poisoned(*features):
            calls["step"] += 1
            loss = loss_fn(*features)
            return loss * float("nan") if calls["step"] in nan_steps and dist.get_rank() == 0 else loss

        return poisoned

    stage2.build_contrastive_loss = poisoned_build
    try:
        return stage2.train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))
    except FloatingPointError as err:
        return {"error": str(err)}


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            out.update(_tensors(value, f"{prefix}/{key}"))
        return out
    if isinstance(obj, list | tuple):
        out = {}
        for index, value in enumerate(obj):
            out.update(_tensors(value, f"{prefix}/{index}"))
        return out
    return {}


def _trained_state(step_dir: Path) -> dict:
    """Weights, optimizer state and lr schedule of a stage-2 checkpoint, as comparable tensors and numbers."""
    state: dict = {}
    for path in sorted((step_dir / "vision").glob("*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        for part in ("module", "optimizer", "optimizer_state_dict"):
            state.update({f"{path.name}:{k}": v for k, v in _tensors(saved.get(part), part).items()})
        if saved.get("lr_scheduler") is not None:
            state[f"{path.name}:last_epoch"] = saved["lr_scheduler"]["last_epoch"]
    return state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_consecutive(
    tiny_data: Path, tmp_path: Path, zero_stage: int
) -> None:
    # ZeRO-0 in fp32 relies on our optimizer guard (train/engine.py), ZeRO-1 on DeepSpeed's overflow check.
    run = tmp_path / "run"
    overrides = _overrides(tiny_data, run, 8, f"parallel.zero_stage={zero_stage}",
                           "train.max_consecutive_skipped_steps=2")
    for result in run_on_ranks(_stage2_with_nan_steps, 2, overrides, [3, 5, 6]):
        assert "2 consecutive steps up to step 6" in result["error"]
        assert "step5" in result["error"]  # the last committed checkpoint, named
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step5" and not (ckpt / "step6").exists()
    before, skipped, after = (_trained_state(ckpt / f"step{s}") for s in (2, 3, 4))
    assert before and _same(before, skipped)  # weights, optimizer moments and lr schedule untouched
    assert not _same(skipped, after)  # training went on
    assert _same(after, _trained_state(ckpt / "step5"))
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert [s for s, loss in losses.items() if loss != loss] == [3, 5, 6]  # NaN exactly there
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 1, 1, 2, 3]


def _llm2clip_cc_with_nan_step(overrides: list[str], nan_step: int) -> dict:
    import llm2clip_scale.train.llm2clip_cc as cc

    simcse = cc.simcse_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = simcse(*args, **kwargs)
        return loss * float("nan") if calls["n"] == nan_step else loss

    cc.simcse_loss = poisoned
    return cc.train_llm2clip_cc(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides))


def test_llm2clip_cc_skips_a_non_finite_step(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [*_overrides(tiny_data, run, 3), "stage1.eval_pairs=null", "train.micro_batch=4"]
    result = run_on_ranks(_llm2clip_cc_with_nan_step, 2, overrides, 2)[0]
    assert result["skipped_steps"] == 1
    lora = [load_file(str(run / "ckpt" / f"step{s}" / "lora.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    assert any(not torch.equal(lora[1][k], lora[2][k]) for k in lora[0])


def _train_dying_in_save(overrides: list[str], dying_step: int) -> dict:
    """Stage 2 whose background writer kills its own process (SIGKILL) half-way through the ``dying_step`` save."""
    from llm2clip_scale.checkpoint import writer
    from llm2clip_scale.train.stage2 import train_stage2

    run = writer.PendingFiles.run

    def dying_run(self: writer.PendingFiles) -> dict:
        if self.root.name == f".step{dying_step}.tmp":
            path, write = self.writes[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            os.kill(os.getpid(), signal.SIGKILL)
        return run(self)

    writer.PendingFiles.run = dying_run
    return train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))


def _train(overrides: list[str]) -> dict:
    from llm2clip_scale.train.stage2 import train_stage2

    return train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = _overrides(tiny_data, run, 6, "checkpoint.interval=2")
    with pytest.raises(Exception, match="(?i)signal|exit"):
        run_on_ranks(_train_dying_in_save, 2, overrides, 4)
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step2"
    assert (ckpt / ".step4.tmp").is_dir() and not (ckpt / "step4").exists()
    first = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]

    result = run_on_ranks(_train, 2, overrides)[0]  # train.resume=auto
    assert result["resumed_from"] == str(ckpt / "step2") and result["steps"] == 6
    assert not (ckpt / ".step4.tmp").exists() and (ckpt / "latest").read_text().strip() == "step6"
    lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r["loss"] for r in lines[len(first):] if "loss" in r}
    before = {r["step"]: r["loss"] for r in first if "loss" in r}
    assert sorted(again) == [3, 4, 5, 6]
    assert all(again[s] == before[s] for s in before if s >= 3)  # the redone steps repeat the lost ones exactly


def _train_stopped_at(overrides: list[str], stop_step: int) -> dict:
    """Stage 2 where rank 0 alone asks to stop (as a preemption signal handler would) during step ``stop_step``."""
    import torch.distributed as dist

    from llm2clip_scale.train import loop
    from llm2clip_scale.train.stage2 import Stage2Task

    class StoppedTask(Stage2Task):
        calls = 0

        def step(self, micro_batches):
            self.calls += 1
            if self.calls == stop_step and dist.get_rank() == 0:
                loop.request_stop()
            return super().step(micro_batches)

    return loop.run(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides), StoppedTask())


def test_a_stop_request_on_one_rank_saves_that_step_on_all_and_stops(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = run_on_ranks(_train_stopped_at, 2, tiny_overrides(tiny_data, run, 6, "checkpoint.interval=4"), 3)
    for result in results:
        assert result["stopped_early"] and result["steps"] == 3 and result["checkpoint"] == str(run / "ckpt" / "step3")
        assert "r1_i2t" not in result  # no final evaluation for a run that stops early
    assert (run / "ckpt" / "latest").read_text().strip() == "step3"
