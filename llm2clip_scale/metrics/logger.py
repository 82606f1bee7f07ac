"""Per-step scalars to TensorBoard, a progress bar and periodic log lines — all on rank 0 only."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from llm2clip_scale.config.schema import LoggingConfig

log = logging.getLogger("llm2clip_scale.train")


class MetricLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int, is_main: bool, run_name: str = "stage2") -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = Path(cfg.dir) / run_name
            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if cfg.progress_bar:
            self.bar = tqdm(total=total_steps, desc=run_name, dynamic_ncols=True, mininterval=2.0)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        if step % self.cfg.interval == 0 or step == 1:
            text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            log.info("step %d %s", step, text)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main and self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
