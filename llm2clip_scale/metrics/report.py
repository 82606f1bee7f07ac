"""One PNG of a run: loss, learning rate, logit scale, gradient norm and eval curves, and a table of final metrics.

Reads what the loop writes under ``logging.dir`` (metrics/logger.py): ``metrics.jsonl`` (one line per step, one per
evaluation) and ``result.json``; not the TensorBoard events, which hold the same scalars. A resumed run appends and
redoes the steps after its checkpoint, so a step line at or below a step already read starts a new trajectory there:
the earlier lines from that step on are dropped (the later line for a step wins, and the tail of an abandoned attempt
goes with it). Lines that are not a step or eval record (a run killed mid-write leaves a torn last line, to which
the resumed run's first line is glued) are skipped and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

Series = tuple[list[int], list[float]]

# (panel title, step-line keys, y label); a key a stage does not log is simply absent from its lines.
PANELS = (
    ("loss", ("loss", "l_ins", "l_struct"), "loss"),
    ("learning rate", ("lr", "llm_lora_lr"), "lr"),
    ("logit scale", ("logit_scale",), "exp(t)"),
    ("gradient norm", ("grad_norm", "llm_lora_grad_norm"), "norm"),
)
SIZE_PX = (1200, 750)
DPI = 100


class ReportError(ValueError):
    """The run directory cannot be reported (no metrics.jsonl, or not one usable line in it)."""


@dataclass
class RunRecords:
    """A run's scalars by name, each sorted by step, after the resume rule (see the module docstring)."""

    path: Path
    steps: dict[str, Series] = field(default_factory=dict)
    evals: dict[str, Series] = field(default_factory=dict)
    result: dict | None = None
    malformed: int = 0  # lines skipped: not JSON, not an object, no integer step, neither "loss" nor "eval"
    superseded: int = 0  # step and eval lines dropped because a resume (or a fresh start) redid their steps
    stale_result_steps: int | None = None  # result.json's steps, when it is not the last logged step's (not used)


def find_metrics(run_dir: str | Path) -> Path:
    """``RUN_DIR/metrics.jsonl`` (RUN_DIR is ``logging.dir``) or ``RUN_DIR/logs/metrics.jsonl`` (a run root)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory (give the run's logging.dir, or a run root with logs/)")
    for candidate in (run_dir / "metrics.jsonl", run_dir / "logs" / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    raise ReportError(f"{run_dir}: no metrics.jsonl in it or in {run_dir / 'logs'} (the training loop writes "
                      "<logging.dir>/metrics.jsonl from its first step on)")


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def read_records(run_dir: str | Path) -> RunRecords:
    """Parse the run's metrics.jsonl (and result.json when present) into per-name series."""
    path = find_metrics(run_dir)
    records = RunRecords(path=path)
    step_lines: dict[int, dict[str, float]] = {}
    eval_lines: dict[int, dict[str, float]] = {}
    last_step = None
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            records.malformed += 1
            # A torn line has no newline, so the resumed run's first line is glued to it: the logger writes "step"
            # first, so the last '{"step"' starts that line.
            start = line.rfind('{"step"')
            try:
                record = json.loads(line[start:]) if start > 0 else None
            except json.JSONDecodeError:
                record = None
            if record is None:
                continue
        step = record.get("step") if isinstance(record, dict) else None
        is_eval = isinstance(record, dict) and isinstance(record.get("eval"), dict)
        is_step = isinstance(record, dict) and isinstance(record.get("loss"), int | float)
        if not isinstance(step, int) or isinstance(step, bool) or not (is_eval or is_step):
            records.malformed += 1
            continue
        if is_eval:
            records.superseded += step in eval_lines
            eval_lines[step] = _numbers(record["eval"])
            continue
        if last_step is not None and step <= last_step:
            # Resumed from a checkpoint before this step (or started afresh): what was logged from here on belongs
            # to an attempt that did not continue. An eval at the checkpoint's own step (< step) stays.
            stale = [s for s in step_lines if s >= step]
            stale_evals = [s for s in eval_lines if s >= step]
            records.superseded += len(stale) + len(stale_evals)
            for s in stale:
                del step_lines[s]
            for s in stale_evals:
                del eval_lines[s]
        step_lines[step] = _numbers({k: v for k, v in record.items() if k != "step"})
        last_step = step
    if not step_lines and not eval_lines:
        raise ReportError(f"{path}: no step or eval line in it ({records.malformed} malformed lines)")
    records.steps = _columns(step_lines)
    records.evals = _columns(eval_lines)
    result_path = path.parent / "result.json"
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = None  # a torn result.json: the table falls back to the last logged lines
        # A run resumed past an earlier finish (more train.steps) and not finished yet leaves the old result.json.
        if isinstance(result, dict) and result.get("steps") == last_step:
            records.result = result
        elif isinstance(result, dict):
            records.stale_result_steps = result.get("steps")
    return records


def _columns(lines: dict[int, dict[str, float]]) -> dict[str, Series]:
    columns: dict[str, Series] = {}
    for step in sorted(lines):
        for name, value in lines[step].items():
            xs, ys = columns.setdefault(name, ([], []))
            xs.append(step)
            ys.append(value)
    return columns


def final_metrics(records: RunRecords) -> list[tuple[str, str]]:
    """(name, value) rows for the table: result.json's scalars, else the last step and eval lines' values."""
    if records.result is not None:
        source = {k: v for k, v in records.result.items() if k == "stage" or isinstance(v, int | float)}
    else:
        stale = records.stale_result_steps
        source: dict[str, object] = {"result.json": "absent (run unfinished?)" if stale is None
                                     else f"of step {stale}: stale, not shown"}
        if "loss" in records.steps:
            source["last step"], source["last loss"] = (column[-1] for column in records.steps["loss"])
        source.update({f"last {k}": records.steps[k][1][-1] for k in ("lr", "logit_scale") if k in records.steps})
        source.update({f"last eval {k}": v[1][-1] for k, v in records.evals.items()})
    if records.malformed or records.superseded:
        source["malformed lines"] = records.malformed
        source["superseded lines"] = records.superseded
    return [(k, _format(v)) for k, v in source.items()]


def _format(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def build_figure(records: RunRecords, size_px: tuple[int, int] = SIZE_PX) -> Figure:
    """A 2x3 grid: the four step panels, the eval panel and the final-metrics table."""
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    stage = (records.result or {}).get("stage", "run")
    fig.suptitle(f"{stage}: {records.path.parent}", fontsize=11)
    for ax, (title, keys, ylabel) in zip(axes, PANELS):
        present = [k for k in keys if k in records.steps]
        for key in present:
            xs, ys = records.steps[key]
            ax.plot(xs, ys, label=key, linewidth=1.2)
        _decorate(ax, title, ylabel, present)
    ax = axes[len(PANELS)]
    curves = [k for k in records.evals if _is_curve(k)]
    for key in curves:
        xs, ys = records.evals[key]
        ax.plot(xs, ys, label=key, marker="o", markersize=3, linewidth=1.2)
    if curves and "chance" in records.evals:
        ax.axhline(records.evals["chance"][1][-1], color="grey", linestyle="--", linewidth=1, label="chance")
    before = (records.result or {}).get("cra_before")
    if "cra" in curves and isinstance(before, int | float):  # stage 1 measures the untrained tower's CRA first
        ax.plot([0], [before], label="cra_before", marker="s", linestyle="none", color="grey")
    _decorate(ax, "eval", "metric", curves)
    _table(axes[len(PANELS) + 1], final_metrics(records))
    return fig


def _is_curve(eval_key: str) -> bool:
    """Counts (``num_samples``, ``<task>/num_pairs``) and chance levels are not curves; the top-level ``chance`` (of
    the R@k of retrieval) is drawn as a reference line."""
    name = eval_key.rsplit("/", 1)[-1]
    return name != "chance" and not name.startswith("num_")


def missing_panels(records: RunRecords) -> list[str]:
    """Titles of the panels this run logged nothing for (a stage without a logit scale, a run without evals)."""
    missing = [title for title, keys, _ in PANELS if not any(key in records.steps for key in keys)]
    return missing + ([] if any(_is_curve(key) for key in records.evals) else ["eval"])


def _decorate(ax, title: str, ylabel: str, present: list[str]) -> None:
    ax.set_title(title, fontsize=10)
    if not present:
        ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _table(ax, rows: list[tuple[str, str]]) -> None:
    ax.axis("off")
    ax.set_title("final metrics", fontsize=10)
    if rows:
        table = ax.table(cellText=[list(r) for r in rows], colWidths=[0.55, 0.45], loc="upper center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.1)


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 size_px: tuple[int, int] = SIZE_PX) -> tuple[Path, RunRecords]:
    """Read ``run_dir`` and write its PNG to ``out`` (default: ``report.png`` next to metrics.jsonl)."""
    records = read_records(run_dir)
    out = Path(out) if out is not None else records.path.parent / "report.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas = build_figure(records, size_px).canvas
    canvas.draw()
    # Line plots use a few dozen colours: a 256-colour palette looks the same at a third of the RGBA file's size.
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB").quantize(256)
    image.save(out, format="PNG", optimize=True)
    return out, records
