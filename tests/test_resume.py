"""Exact resume after SIGKILL, for every stage, through the real command line on 2 gloo ranks.

Each case trains once uninterrupted, then trains again into a fresh directory, is killed with SIGKILL (the whole
process tree: torchrun, ranks, loader workers) at a random step after its first checkpoint, and is restarted with
the same command (``train.resume=auto``). The resumed run's loss at every step, and its final parameters, must equal
the uninterrupted run's exactly; the steps the killed run logged before dying are a second independent run of
the same config, so they check run-to-run determinism too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, loss_records, tiny_overrides

STEPS = 6
INTERVAL = 2


def _common(data: Path, run_dir: Path) -> list[str]:
    return tiny_overrides(data, run_dir, STEPS, "train.warmup_steps=2", f"checkpoint.interval={INTERVAL}",
                          "logging.interval=1")


def _stage2(data: Path, run_dir: Path) -> list[str]:
    # 2 ranks x 2 loader workers, caption-field mixing, shuffling and random crops: the data position of every
    # worker must be restored, and gradient accumulation (2 micro-steps) crosses no checkpoint.
    return [*_common(data, run_dir), "train.micro_batch=4", "data.num_workers=2",
            "data.shuffle_buffer=50", "data.augment=random_resized_crop", "eval.interval=3"]


CASES = {
    # Online stage 2 with a trainable LLM LoRA (its AdamW state and schedule live in llm/, outside DeepSpeed) and
    # ProCLIP's self-distillation (the EMA teacher lives in shared/): every piece of state outside DeepSpeed in one
    # run, since each case costs three launches.
    "stage2_online_lora_ema": ("tiny_cpu.yaml", lambda d, s, r, run: [
        *_stage2(d, run), "model.llm.lora_rank=4", "model.llm.lora_alpha=8", "train.self_distill_weight=1.0",
        "train.ema_momentum=0.9"]),
    "stage2_offline": ("tiny_cpu.yaml", lambda d, s, r, run: [
        *_stage2(d, run), f"data.train_embedding_shards={s}/train-{{000000..000003}}.tar",
        f"data.eval_embedding_shards={s}/eval-000000.tar", "model.llm.tokenizer=''"]),
    "llm2clip_cc": ("llm2clip_cc_tiny.yaml", lambda d, s, r, run: [
        *_common(d, run), "train.micro_batch=4", f"stage1.eval_pairs={d}/eval-000000.tar",
        "data.shuffle_buffer=50", "eval.interval=3"]),
    # The official two views (one loader per view: both loaders' positions must be restored).
    "proclip_inherit": ("proclip_inherit_tiny.yaml", lambda d, s, r, run: [
        *_common(d, run), "data.num_workers=1", "proclip.views=[short,raw]", "proclip.structure_views=[short]",
        f"proclip.teacher_text={r}/text"]),
}


def _launch(config: str, overrides: list[str], log: Path, slow_after: int | None = None) -> subprocess.Popen:
    """``slow_after``: every step after it sleeps first (tests/stall/sitecustomize.py), so a kill after a logged
    step lands before the run ends."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llm2clip_scale", "train", str(REPO / "configs" / config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if slow_after is not None:
        env.update(PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "stall"), str(REPO), env.get("PYTHONPATH", "")]),
                   LLM2CLIP_TEST_SLOW_STEPS=f"after={slow_after},seconds=2")
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it. torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks training on (and writing checkpoints) unseen."""
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:  # frozen first, so none starts another process or takes another step while we kill
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(tree, timeout=60)
    proc.wait()


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    assert code == 0, f"run failed ({code}):\n{log.read_text()[-5000:]}"


def _kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, rng: random.Random) -> int:
    """SIGKILL the run's process group at a random step after its first checkpoint; return that step."""
    deadline = time.monotonic() + 600
    kill_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        latest = run_dir / "ckpt" / "latest"
        if kill_at is None and latest.is_file():
            first = int(latest.read_text().strip().removeprefix("step"))
            kill_at = rng.randint(first + 1, STEPS - 1)
        logged = [step for step, _ in loss_records(run_dir)]
        if kill_at is not None and logged and max(logged) >= kill_at:
            _kill_tree(proc)
            return max(logged)
        time.sleep(0.02)
    _kill_tree(proc)
    raise AssertionError(f"the run ended (code {proc.poll()}) before it could be killed after a checkpoint")


def _final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    step = run_dir / "ckpt" / f"step{STEPS}"
    tensors: dict[str, torch.Tensor] = {}
    module = step / "vision" / "mp_rank_00_model_states.pt"
    if module.is_file():
        tensors.update(torch.load(module, map_location="cpu", weights_only=False)["module"])
    for shared in (step / "shared").glob("*.safetensors"):
        tensors.update({f"{shared.name}:{k}": v for k, v in load_file(str(shared)).items()})
    if (step / "lora.safetensors").is_file():
        tensors.update(load_file(str(step / "lora.safetensors")))
    assert tensors, f"no parameters found under {step}"
    return tensors


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_is_bit_exact(case: str, tiny_data: Path, tiny_sidecars: Path,
                                          tiny_reference_clip: Path, tmp_path: Path) -> None:
    config, make = CASES[case]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    log = tmp_path / "log.txt"
    _finish(_launch(config, make(tiny_data, tiny_sidecars, tiny_reference_clip, reference), log), log)
    expected = dict(loss_records(reference))
    assert sorted(expected) == list(range(1, STEPS + 1))

    overrides = make(tiny_data, tiny_sidecars, tiny_reference_clip, interrupted)
    killed_at = _kill_after_first_checkpoint(_launch(config, overrides, log, slow_after=INTERVAL), interrupted,
                                             random.Random())
    first_attempt = dict(loss_records(interrupted))
    _finish(_launch(config, overrides, log), log)  # the same command: train.resume=auto

    # Two runs of one config agree exactly, step for step (determinism), up to the kill ...
    assert {s: first_attempt[s] for s in first_attempt} == {s: expected[s] for s in first_attempt}, killed_at
    # ... and the resumed run continues exactly where the uninterrupted one went.
    resumed = dict(loss_records(interrupted))  # later lines win: the steps redone after the resume
    assert resumed == expected, f"killed after step {killed_at}"
    final, reference_final = _final_parameters(interrupted), _final_parameters(reference)
    assert final.keys() == reference_final.keys()
    for key, value in reference_final.items():
        assert torch.equal(final[key], value), key
    result = json.loads((interrupted / "logs" / "result.json").read_text())
    assert result["resumed_from"].startswith(str(interrupted / "ckpt"))
    # The kill landed mid-run: the resumed run trained steps of its own (else the comparisons above prove nothing).
    assert killed_at < STEPS and int(result["resumed_from"].rsplit("step", 1)[1]) < STEPS, result["resumed_from"]
    assert result["final_loss"] == json.loads((reference / "logs" / "result.json").read_text())["final_loss"]
