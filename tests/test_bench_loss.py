"""tools/bench_loss.py at a tiny size: the table prints every loss with its equality check, and the checker is live."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "bench_loss.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_loss", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_loss_smoke(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    # A subprocess: the tool forks its ranks, which is only safe from a process that has run no torch op yet.
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--batches", "64", "--dim", "16", "--rounds", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| 64 |")}
    names = _load_tool().DEFAULT_LOSSES.split(",")
    assert sorted(rows) == sorted(names)
    for name, row in rows.items():
        # Every compared loss carries a measured difference that passed; the references say so.
        assert row.rstrip(" |").endswith("ok" if name not in ("clip_openclip", "siglip_openclip") else "reference")
    assert "equality checks: 4/4 within 1e-05" in table
    for field in ("- command:", "- date:", "- machine:", "- load average"):
        assert field in table
    assert out.read_text().strip() == table.strip()


def test_checker_reports_a_planted_difference(tmp_path: Path) -> None:
    tool = _load_tool()
    gen = torch.Generator().manual_seed(0)
    ref_dir, same_dir, off_dir = (tmp_path / name for name in ("ref", "same", "off"))
    for rank in range(2):
        grads = {key: torch.randn(shape, generator=gen)
                 for key, shape in (("loss", ()), ("image", (4, 3)), ("text", (4, 3)), ("scale", ()))}
        for folder in (ref_dir, same_dir, off_dir):
            folder.mkdir(exist_ok=True)
            planted = dict(grads)
            if folder is off_dir and rank == 1:
                planted["text"] = grads["text"].clone()
                planted["text"][2, 1] += 1e-3 * grads["text"].abs().max()
            torch.save(planted, folder / f"grads{rank}.pt")
    result = tmp_path / "errors.json"
    pairs = [("infonce", str(same_dir), "clip_openclip", str(ref_dir)),
             ("infonce_tiled:3", str(off_dir), "clip_openclip", str(ref_dir))]
    tool._compare(0, pairs, 2, str(result))
    errors = json.loads(result.read_text())
    assert errors["infonce"]["error"] == 0.0
    assert errors["infonce_tiled:3"]["worst"] == "text"
    assert errors["infonce_tiled:3"]["error"] == pytest.approx(1e-3, rel=1e-3)
