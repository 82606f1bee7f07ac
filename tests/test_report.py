"""`llm2clip-scale report`: metrics.jsonl as the logger writes it (resumed attempts, a torn line) -> the series, the
plotted lines, the PNG; a real stage-1 run's logs; the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llm2clip_scale.cli import main
from llm2clip_scale.config.schema import LoggingConfig
from llm2clip_scale.metrics.logger import MetricLogger
from llm2clip_scale.metrics.report import (
    SIZE_PX,
    ReportError,
    build_figure,
    missing_panels,
    read_records,
    write_report,
)
from tests.conftest import loss_records


def _png(path: Path) -> tuple[str, tuple[int, int]]:
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated or corrupt file raises here
        return image.format, image.size


def _scalars(attempt: int, step: int) -> dict[str, float]:
    # Each attempt's values differ, so the test can tell which attempt's line a step kept.
    return {"loss": 5.0 - 0.25 * step + attempt / 100, "lr": 1e-3 * step + attempt * 1e-6,
            "logit_scale": 14.0 + step / 8 + attempt / 1000, "grad_norm": 2.0 * step + attempt,
            "samples_per_s": 100.0, "skipped_steps": 0}


def _eval(attempt: int, step: int) -> dict[str, float]:
    # stage 2's R@k and an LLM task's "<task>/<metric>" keys; counts and chance levels are not curves
    return {"r1_i2t": step / 100 + attempt / 1000, "r1_t2i": step / 50 + attempt / 1000, "chance": 1 / 64,
            "num_samples": 64, "zeroshot/top1": step / 20, "zeroshot/num_classes": 4, "zeroshot/chance": 0.25}


def _attempt(log_dir: Path, attempt: int, steps: range, evals: tuple[int, ...]) -> None:
    logger = MetricLogger(LoggingConfig(dir=str(log_dir), interval=100, tensorboard=False, progress_bar=False),
                          total_steps=8, is_main=True, start_step=steps.start - 1)
    for step in steps:
        logger.log_step(step, _scalars(attempt, step))
        if step in evals:
            logger.log_eval(step, _eval(attempt, step))
    logger.close()


@pytest.fixture
def resumed_run(tmp_path: Path) -> Path:
    """A run root (logs/ inside, tiny_overrides' layout) of three attempts. Attempt 1 logs steps 1-10 and dies
    mid-line; attempt 2 resumes from a checkpoint at 3, logs 4-5, dies; attempt 3 resumes from 4 and finishes at 8,
    before attempt 1's last steps: those belong to an abandoned trajectory."""
    logs = tmp_path / "logs"
    _attempt(logs, 1, range(1, 11), evals=(3, 6, 9))
    with open(logs / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 3.2, "lr"')  # torn: the process died mid-line; attempt 2's first line joins it
    _attempt(logs, 2, range(4, 6), evals=())
    with open(logs / "metrics.jsonl", "a") as f:
        f.write("\n[1, 2]\n")  # an empty line (not counted) and valid JSON that is not a record
    _attempt(logs, 3, range(5, 9), evals=(6, 8))
    (logs / "result.json").write_text(json.dumps({"stage": "stage2", "steps": 8, "final_loss": 3.03,
                                                  "r1_i2t": 0.083, "checkpoint": "ckpt/step8"}))
    return tmp_path


# step -> the attempt whose line counts: 1-3 from attempt 1 (before the first resume point), 4 from attempt 2,
# 5-8 from attempt 3; attempt 1's 4-10 (and its evals at 6 and 9) and attempt 2's 5 are superseded.
KEPT = {1: 1, 2: 1, 3: 1, 4: 2, 5: 3, 6: 3, 7: 3, 8: 3}
KEPT_EVALS = {3: 1, 6: 3, 8: 3}


def test_resumed_and_torn_lines_keep_the_last_attempt(resumed_run: Path) -> None:
    records = read_records(resumed_run)
    assert records.path == resumed_run / "logs" / "metrics.jsonl"
    assert records.malformed == 2
    # attempt 1's steps 4-10 and its evals at 6 and 9 (at attempt 2's start), attempt 2's 5 (at attempt 3's start)
    assert records.superseded == 10
    for name in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s"):
        assert records.steps[name] == (list(KEPT), [_scalars(a, s)[name] for s, a in KEPT.items()]), name
    for name in _eval(1, 1):
        assert records.evals[name] == (list(KEPT_EVALS), [_eval(a, s)[name] for s, a in KEPT_EVALS.items()]), name
    assert records.result["stage"] == "stage2"
    # RUN_DIR given as the logging dir itself reads the same file
    assert read_records(resumed_run / "logs").steps == records.steps


def test_plotted_lines_are_the_records(resumed_run: Path) -> None:
    records = read_records(resumed_run)
    fig = build_figure(records)
    axes = {ax.get_title(): ax for ax in fig.axes}
    expected = {"loss": ["loss"], "learning rate": ["lr"], "logit scale": ["logit_scale"],
                "gradient norm": ["grad_norm"]}
    for title, names in expected.items():
        lines = {line.get_label(): line for line in axes[title].get_lines()}
        assert sorted(lines) == names, title
        for name in names:
            assert (list(lines[name].get_xdata()), list(lines[name].get_ydata())) == records.steps[name]
    lines = {line.get_label(): line for line in axes["eval"].get_lines()}
    assert sorted(lines) == ["chance", "r1_i2t", "r1_t2i", "zeroshot/top1"]
    for name in ("r1_i2t", "r1_t2i", "zeroshot/top1"):
        assert (list(lines[name].get_xdata()), list(lines[name].get_ydata())) == records.evals[name]
    assert list(lines["chance"].get_ydata()) == [1 / 64, 1 / 64]
    assert missing_panels(records) == []
    table = axes["final metrics"].tables[0]
    rows = {table[r, 0].get_text().get_text(): table[r, 1].get_text().get_text() for r in range(6)}
    # result.json's scalars (not its checkpoint path), then the skip counts
    assert rows == {"stage": "stage2", "steps": "8", "final_loss": "3.03", "r1_i2t": "0.083",
                    "malformed lines": "2", "superseded lines": "10"}


def test_png_of_the_stated_size(resumed_run: Path, tmp_path: Path) -> None:
    out, _ = write_report(resumed_run)
    assert out == resumed_run / "logs" / "report.png"
    assert _png(out) == ("PNG", SIZE_PX)
    out, _ = write_report(resumed_run, tmp_path / "sub" / "small.png", size_px=(600, 400))
    assert _png(out) == ("PNG", (600, 400))


def test_proclip_terms_plotted_and_missing_panels_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger = MetricLogger(LoggingConfig(dir=str(tmp_path), tensorboard=False, progress_bar=False), 3, True)
    for step in (1, 2, 3):  # proclip_inherit's step line: loss and its terms, lr, grad_norm; no eval, no logit scale
        logger.log_step(step, {"loss": 3.0 / step, "l_ins": 2.0 / step, "l_struct": 1.0 / step, "lr": 0.1,
                               "grad_norm": 1.0})
    logger.close()
    records = read_records(tmp_path)
    fig = build_figure(records)
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    lines = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    assert lines == {"loss": [3.0, 1.5, 1.0], "l_ins": [2.0, 1.0, 2.0 / 3], "l_struct": [1.0, 0.5, 1.0 / 3]}
    assert missing_panels(records) == ["logit scale", "eval"]
    empty_ax = next(ax for ax in fig.axes if ax.get_title() == "logit scale")
    assert not empty_ax.get_lines() and [t.get_text() for t in empty_ax.texts] == ["not logged by this run"]
    assert records.result is None
    table = next(ax for ax in fig.axes if ax.get_title() == "final metrics").tables[0]
    assert [table[r, 1].get_text().get_text() for r in range(3)] == ["absent (run unfinished?)", "3", "1"]
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "not logged by this run: logit scale, eval" in printed and "no result.json" in printed
    assert (tmp_path / "report.png").is_file()


def test_stage1_cra_curve_starts_from_cra_before(tmp_path: Path) -> None:
    logger = MetricLogger(LoggingConfig(dir=str(tmp_path), tensorboard=False, progress_bar=False), 4, True)
    for step in (1, 2, 3, 4):  # llm2clip_cc's step line, and its CRA evaluation every 2 steps
        logger.log_step(step, {"loss": 4.0 - step / 2, "lr": 0.005, "grad_norm": 9.0, "replay_error": 0.0,
                               "micro_batches": 4.0})
        if step % 2 == 0:
            logger.log_eval(step, {"cra": 0.5 + step / 10, "num_eval_pairs": 64})
    logger.close()
    (tmp_path / "result.json").write_text(json.dumps({"stage": "llm2clip_cc", "steps": 4, "cra_before": 0.25,
                                                         "cra": 0.9}))
    records = read_records(tmp_path)
    eval_ax = next(ax for ax in build_figure(records).axes if ax.get_title() == "eval")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in eval_ax.get_lines()}
    # num_eval_pairs is a count, not a curve; no chance line without a chance value
    assert lines == {"cra": ([2, 4], [0.7, 0.9]), "cra_before": ([0], [0.25])}
    assert missing_panels(records) == ["logit scale"]


def test_real_stage1_run(tiny_stage1_checkpoint: Path, tmp_path: Path) -> None:
    run_root = tiny_stage1_checkpoint.parent  # tiny_overrides' layout: <run>/ckpt, <run>/logs
    out, records = write_report(run_root, tmp_path / "stage1.png")
    logged = dict(loss_records(run_root))
    assert records.steps["loss"] == (list(logged), list(logged.values()))
    assert list(logged) == [1, 2, 3]
    assert records.malformed == records.superseded == 0
    assert records.result["stage"] == "llm2clip_cc"
    assert records.result["final_loss"] == pytest.approx(logged[3], abs=1e-6)  # result.json rounds to 6 places
    # stage 1 logs lr and grad_norm, has no logit scale, and evaluates nothing here (stage1.eval_pairs=null)
    assert {"lr", "grad_norm", "replay_error"} <= set(records.steps)
    assert missing_panels(records) == ["logit scale", "eval"]
    assert _png(out) == ("PNG", SIZE_PX)


def test_cli(resumed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text('{"step": 1, "lo\n')
    assert main(["report", str(empty)]) == 2
    assert "no step or eval line in it (1 malformed lines)" in capsys.readouterr().err
    with pytest.raises(ReportError, match="no step or eval line"):
        read_records(empty)

    out = tmp_path / "report.png"
    assert main(["report", str(resumed_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 8 steps, 3 evaluations" in printed
    assert "skipped 2 malformed lines; 10 lines superseded by a resume" in printed
    assert out.is_file()
    with pytest.raises(SystemExit):  # argparse: exit 2, unknown arguments
        main(["report", str(resumed_run), "extra"])


def test_stale_result_json_is_not_shown(resumed_run: Path, capsys: pytest.CaptureFixture) -> None:
    # an earlier finish at step 6, then a resume to more steps not finished yet (logged up to 8)
    (resumed_run / "logs" / "result.json").write_text(json.dumps({"stage": "stage2", "steps": 6, "final_loss": 9.0}))
    records = read_records(resumed_run)
    assert (records.result, records.stale_result_steps) == (None, 6)
    table = next(ax for ax in build_figure(records).axes if ax.get_title() == "final metrics").tables[0]
    assert [table[r, 1].get_text().get_text() for r in range(3)] == ["of step 6: stale, not shown", "8",
                                                                     f"{_scalars(3, 8)['loss']:.4g}"]
    assert main(["report", str(resumed_run)]) == 0
    assert "result.json is of step 6, not the last logged step: not shown" in capsys.readouterr().out
