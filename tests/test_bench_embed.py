"""Smoke test of tools/bench_embed.py at a tiny size, in a subprocess (the tool sets up its own one-rank world and
megatron state): it prints its table, both paths produce the same vectors, and the length-bucketed path computes
fewer padded positions than file order. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_embed_prints_its_table_and_the_vectors_match(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A world of its own: no rank variables of a surrounding torchrun or Slurm step.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                    "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_embed.py"), "--captions", "40", "--hidden", "64", "--layers",
         "2", "--batch-size", "8", "--rounds", "1", "--max-tokens", "48", "--threads", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| path | median s | real tokens | tokens/s | positions computed | padding | ratio |" in proc.stdout
    assert "vectors matched" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["transformers (file order)", "megatron tower, file order", "megatron tower, length-bucketed"]
    for name, row in rows.items():
        assert f"| {name} |" in proc.stdout and row["tokens_per_s"] > 0 and len(row["runs_s"]) == 1
    assert len({row["tokens"] for row in rows.values()}) == 1  # the same real tokens on every path
    assert result["vectors_match"] and result["max_rel_err"] <= 1e-4
    bucketed, file_order = rows["megatron tower, length-bucketed"], rows["megatron tower, file order"]
    assert bucketed["positions"] < file_order["positions"] == rows["transformers (file order)"]["positions"]
