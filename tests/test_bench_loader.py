"""tools/bench_loader.py at a tiny size: the table prints for both loaders, both deliver the same number of samples of
the expected shape, and both pipelines provably see the same samples (no timing is asserted)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "tools" / "bench_loader.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_tool()
TINY = ["--synthetic-shards", "2", "--synthetic-per-shard", "6", "--synthetic-min-size", "40x30",
        "--synthetic-max-size", "64x48"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("bench_loader")
    pattern, tokenizer = bench.write_synthetic_shards(out, 2, 6, (40, 30), (64, 48))
    return out, bench.Settings(pattern, tokenizer, image_size=32, batch_size=4, max_text_len=64, shuffle_buffer=8)


def test_cli_prints_the_table_for_both_loaders(tiny_set, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = tiny_set
    argv = ["--data-dir", str(out), *TINY, "--image-size", "32", "--batch-size", "4", "--workers", "0,1",
            "--warmup", "1", "--batches", "2", "--rounds", "1", "--check", "--shuffle-buffer", "8"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "same samples: True" in text
    for loader in ("ours", "open_clip"):
        for workers in (0, 1):
            assert re.search(rf"^\| {loader} \| {workers} \| 4 \| 32 \| [0-9.]+ \| ", text, re.M), (loader, text)
    # The samples/s ratio is filled on the rows of ours (the CPU ratio may be empty: a tiny run can take < 1 tick).
    assert re.search(r"^\| ours \| 1 \| .* \| [0-9.]+ \| [0-9.]* \|$", text, re.M)
    delivered = ast.literal_eval(text.split("samples per timed run and image shape: ", 1)[1].splitlines()[0])
    assert delivered == {(loader, workers): ([8], [(3, 32, 32)]) for loader in ("ours", "open_clip")
                         for workers in (0, 1)}


def test_both_loaders_deliver_the_same_batches_shape(tiny_set) -> None:
    _, settings = tiny_set
    runs = bench.benchmark(settings, [0], warmup=0, batches=3, rounds=1, log=lambda _: None)
    assert {run.loader for run in runs} == {"ours", "open_clip"}
    for run in runs:
        assert (run.samples, run.image_shape, run.text_rows) == (12, (3, 32, 32), 12), run


def test_the_table_survives_a_run_below_one_clock_tick() -> None:
    runs = [bench.Run(kind, 1, 0.1, 100.0, 0.0, 8, (3, 32, 32), 8) for kind in ("ours", "open_clip")]
    table = bench.format_table(bench.summarize(runs), bench.Settings("p", "t", image_size=32, batch_size=4))
    assert "| ours | 1 | 4 | 32 | 100.0 |" in table and table.rstrip().endswith("|")


def test_both_pipelines_see_the_same_samples(tiny_set) -> None:
    _, settings = tiny_set
    result = bench.same_samples(settings)
    assert result["same"] and result["ours_keys_equal_shards"], result
    assert result["samples"] == result["ours"] == result["open_clip"] == result["matched"] == 12


def test_the_same_samples_check_is_not_vacuous(tiny_set, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another normalisation in open_clip's transform alone leaves every sample unmatched."""
    _, settings = tiny_set
    shifted = bench.ImageTransform(settings.image_size, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "none", None)
    monkeypatch.setattr(bench.Settings, "transform", lambda self: shifted)
    result = bench.same_samples(dataclasses.replace(settings))
    assert not result["same"] and result["unmatched"] == 12, result
