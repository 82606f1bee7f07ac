"""Smoke test of tools/bench_train.py at a tiny size, in a subprocess (the tool starts its own 2-rank gloo worlds):
it prints its table, both trainers ran, started from the same weights and followed the same loss and logit-scale
trajectory, and the profiled runs report phases and collectives. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--timm-kwargs", '{"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}',
        "--text-dim", "64", "--embed-dim", "32", "--adapter-blocks", "1", "--global-batch", "16"]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_prints_its_table_and_both_trainers_do_the_same_work(tmp_path: Path) -> None:
    out, prof = tmp_path / "bench.json", tmp_path / "profile"
    # A world of its own: no rank variables of a surrounding torchrun or Slurm step.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                    "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_train.py"), *TINY, "--warmup", "0", "--steps", "2", "--rounds",
         "1", "--threads", "1", "--profile", str(prof), "--profile-steps", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = ("| trainer | median step s | samples/s | throughput ours/open_clip | peak RSS/rank MB | added MB "
              "| timed-steps peak added MB | memory ours/open_clip | CPU s/step (all ranks) | CPU ours/open_clip |")
    assert header in proc.stdout
    for line in ("machine: ", "command: ", "date: ", "work: vit_tiny_patch16_224", "| ours | ", "| open_clip | "):
        assert line in proc.stdout, line
    assert "trajectories MATCH over 2 steps" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    for row in result["rows"].values():
        assert len(row["step_s"]) == 2 and row["samples_per_s"] > 0 and row["cpu_s_per_step"] > 0
        assert row["peak_mb"] >= row["added_mb"] > 0 and row["step_added_mb"] > 0
    assert result["work"]["zero_stage"] == 1  # configs/tiny_cpu.yaml's: the stage-2 path a CPU user runs
    assert result["same_init"] and result["trajectories_match"]
    ours, ref = result["losses"]["ours"], result["losses"]["open_clip"]
    assert len(ours) == len(ref) == 2 and result["loss_max_rel_diff"] <= result["tolerance"]
    # Not a vacuous comparison: the second step's loss moved far beyond the tolerance (other data, one AdamW
    # update), so a trainer that skipped or repeated a step, or saw other data, would have failed the check.
    assert abs(ours[1] - ours[0]) / ours[0] > 100 * result["tolerance"]
    assert abs(result["scales"]["ours"][1] - result["scales"]["ours"][0]) > 1e-4  # the temperature trained
    profiles = result["profiles"]
    assert {"ours.engine.forward", "ours.engine.backward", "ours.engine.step", "ours.loss"} <= set(
        profiles["ours"]["phases_ms"])
    assert {"open_clip.forward", "open_clip.backward", "open_clip.loss"} <= set(profiles["open_clip"]["phases_ms"])
    for side in ("ours", "open_clip"):  # both gather features (2 all-gathers) and reduce gradients
        comms = profiles[side]["collectives_per_step"]
        assert sum(comms.values()) >= 3, (side, comms)
        assert (prof / f"{side}_rank0.txt").is_file()
        assert f"profile {side} (rank 0, ms/step)" in proc.stdout


def test_trajectory_comparison_flags_a_difference() -> None:
    compare = _tool().compare_trajectories
    losses = [4.1, 3.9, 3.7]
    assert compare(losses, list(losses), 1e-5) == (True, 0.0)
    ok, worst = compare([4.1, 3.9 * (1 + 3e-5), 3.7], losses, 1e-5)
    assert not ok and abs(worst - 3e-5) < 1e-9
    assert not compare(losses[:2], losses, 1e-5)[0]  # a trainer that stopped early never matches
    assert not compare([], [], 1e-5)[0]  # nor does a run that recorded nothing
