"""Per-step scalars to TensorBoard and ``metrics.jsonl``, a progress bar and periodic log lines — rank 0 only.

``<logging.dir>/metrics.jsonl`` gets one JSON object per step (and per evaluation), appended, so a resumed run adds
to it; a step repeated after a resume appears twice, and the later line is the one that counts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from llm2clip_scale.config.schema import LoggingConfig

log = logging.getLogger("llm2clip_scale.train")


class MetricLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int, is_main: bool, run_name: str = "stage2",
                 start_step: int = 0) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not is_main:
            return
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.dir) / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = Path(cfg.dir) / run_name
            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if cfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True, mininterval=2.0)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        self._append({"step": step, **scalars})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        if step % self.cfg.interval == 0 or step == 1:
            text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            log.info("step %d %s", step, text)

    def log_once(self, step: int, name: str, scalars: dict[str, float]) -> None:
        """Values fixed for the run (e.g. FLOPs per sample): TensorBoard ``<name>/<key>`` and one log line; not in
        metrics.jsonl, whose lines stay one per step and per evaluation."""
        if not self.is_main or not scalars:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{name}/{key}", value, step)
        log.info("%s %s", name, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main and self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"eval/{name}", value, step)
        if self.is_main:
            self._append({"step": step, "eval": metrics})

    def _append(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
