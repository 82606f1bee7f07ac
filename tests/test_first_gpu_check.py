"""tools/first_gpu_check.py as a CPU smoke test: every check reports, the GPU-only ones SKIP with a reason (never PASS)
and the CPU-runnable ones (bf16 vs fp32 trajectory, bf16 LoRA state) pass. Runs ``--quick``: three short stage-2 runs
and one stage-1 run, each a fresh process (70-80 s on a 2-core machine when lightly loaded)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "first_gpu_check.py"
# What a CPU can check for real; everything else needs a GPU (or the GPU's extras) and must say SKIP.
CPU_CHECKS = {"trajectory_bf16", "lora_bf16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real GPU checks (~10 minutes)")
def test_cpu_smoke_run_reports_every_check_and_skips_the_gpu_ones(tmp_path: Path) -> None:
    names = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    rows_file = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(rows_file), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    summary = proc.stdout.split("\nsummary:\n", 1)[1]
    printed = re.findall(r"^(PASS|FAIL|SKIP)  (\S+) +(.+)$", summary, flags=re.MULTILINE)
    assert [name for _, name, _ in printed] == names  # one line per check, in order
    rows = {row["name"]: row for row in json.loads(rows_file.read_text())}
    assert list(rows) == names
    for status, name, detail in printed:
        assert (status, detail) == (rows[name]["status"], rows[name]["detail"])
        if name in CPU_CHECKS:
            assert status == "PASS", (name, detail)
        else:
            assert status == "SKIP", (name, detail)
            assert "CUDA" in detail, (name, detail)  # the reason: no usable CUDA here
    assert re.search(rf"{len(names)} checks: {len(CPU_CHECKS)} PASS, 0 FAIL, {len(names) - len(CPU_CHECKS)} SKIP",
                     proc.stdout)
