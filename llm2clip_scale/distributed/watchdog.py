"""Turn a hang into an error: a per-rank thread that ends the process when one phase of a step runs too long.

A stalled rank (a dead data worker, a peer that never reaches the collective, a wedged file system) otherwise sits
in a wait until the collective timeout or the job's time limit. The loop names each phase it enters (data, step,
loss all-reduce, eval, save); when one lasts longer than ``parallel.watchdog_seconds`` this thread logs which rank
stalled, in what phase and at which innermost frame of the main thread (so ``time.sleep`` or an ``all_reduce`` is
named, not just "step 3"), dumps every thread's stack and exits the process non-zero; ``srun --kill-on-bad-exit``
then ends the other ranks and the job. torch's own NCCL watchdog covers only NCCL collectives; this one covers the
loader and the host side too, on every backend.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

log = logging.getLogger("llm2clip_scale.watchdog")

EXIT_CODE = 3  # distinct from Python's 1 (exception) and 2 (usage) so the job log says which


def _exit_process(message: str) -> None:
    # os._exit, not sys.exit: the main thread is the one that is stuck, so raising in this thread would do nothing.
    sys.stderr.flush()
    os._exit(EXIT_CODE)


class Watchdog:
    """``with watchdog.phase("waiting for the data loader", step=3): ...`` arms a deadline for that block."""

    def __init__(self, timeout_s: float, rank: int, on_stall: Callable[[str], None] = _exit_process,
                 poll_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self._on_stall = on_stall
        self._poll_s = poll_s if poll_s is not None else min(5.0, max(timeout_s / 10, 0.05))
        self._main = threading.main_thread().ident
        self._phase: tuple[str, int, float] | None = None  # (what, step, started); replaced atomically
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name=f"watchdog-rank{rank}", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, what: str, step: int) -> Iterator[None]:
        self._phase = (what, step, time.monotonic())
        try:
            yield
        finally:
            self._phase = None

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _innermost_frame(self) -> str:
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return "unknown"
        last = traceback.extract_stack(frame)[-1]
        return f"{last.name} ({last.filename}:{last.lineno})"

    def _watch(self) -> None:
        while not self._closed.wait(self._poll_s):
            current = self._phase
            if current is None:
                continue
            what, step, started = current
            waited = time.monotonic() - started
            if waited <= self.timeout_s:
                continue
            message = (
                f"watchdog: rank {self.rank} stalled for {waited:.0f} s {what} at step {step} "
                f"(parallel.watchdog_seconds={self.timeout_s:g}); innermost frame: {self._innermost_frame()}. "
                "Every thread's stack follows; exiting so that the job ends instead of hanging."
            )
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._on_stall(message)
            return
