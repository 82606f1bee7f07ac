"""tools/eval_reference_clip.py: the CLIP-style baseline of docs/RESULTS.md scored by the stage-2 eval tasks.

Reference: the metrics train_reference_clip.py computes on its in-memory model right after training (its own eval
loader, tokenisation and forward). The tool rebuilds the model from the saved files and reads the eval set through
eval/tasks.py, so equal R@k means the files reload exactly and both read the same images and captions.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_VISION


def _tool():
    spec = importlib.util.spec_from_file_location("eval_reference_clip", REPO / "tools" / "eval_reference_clip.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _overrides(data: Path) -> list[str]:
    # The fixture evaluated its first 16 eval images (eval_samples=16) with tiny_cpu.yaml's caption field.
    return [f"data.eval_shards={data}/eval-000000.tar", f"model.llm.tokenizer={data}/tokenizer", *TINY_VISION,
            "eval.max_samples=16"]


def test_long_retrieval_matches_training_time_eval(tiny_reference_clip: Path, tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reference = json.loads((tiny_reference_clip / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    code = _tool().main([str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_reference_clip),
                         "--tasks", "long_retrieval", "--out", str(out), *_overrides(tiny_data)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["num_samples"] == reference["num_samples"] == 16
    for key in ("r1_i2t", "r5_i2t", "r1_t2i", "r5_t2i"):
        assert printed[key] == pytest.approx(reference[key], abs=1e-6), key
    assert printed["r10_i2t"] >= printed["r5_i2t"] and printed["r10_t2i"] >= printed["r5_t2i"]


def test_rejects_cra_and_a_missing_model(tiny_data: Path, tmp_path: Path) -> None:
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.main([str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tmp_path), "--tasks", "cra"])
    with pytest.raises(FileNotFoundError, match="no vision.safetensors"):
        tool.main([str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tmp_path), *_overrides(tiny_data)])
