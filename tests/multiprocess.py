"""Run a function on N gloo ranks in spawned processes and collect each rank's return value.

Monkeypatches (the megatron CPU layer) happen inside the spawned processes, so they never leak between tests.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    faulthandler.enable(all_threads=True)  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack
    try:
        result = fn(*args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        payload = ("error", traceback.format_exc())
    # Written before any teardown, so that a crash there is reported as one (run_on_ranks says which ranks had
    # returned), not mistaken for a failure of ``fn``.
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as fh:
        pickle.dump(payload, fh)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    # The result is on disk: skip the interpreter's teardown, where native threads of DeepSpeed/gloo left joinable
    # have been seen to abort the process ("terminate called without an active exception") on a loaded machine,
    # failing a test whose ranks had all finished correctly.
    # os._exit also skips multiprocessing's exit handler, which would end the helper processes a rank started
    # (megatron's dist_checkpointing keeps a worker per rank): end them here, or each would outlive the test.
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` ranks with RANK/WORLD_SIZE/MASTER_* set; return results by rank.

    ``fn`` must be a module-level function (it is pickled) and initialise the process group itself
    (e.g. through llm2clip_scale.distributed.topology.init_distributed).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout}s")
        except mp.ProcessExitedException as err:  # a rank died (signal, os._exit): say how far every rank got
            returned = [rank for rank in range(world_size) if (Path(out_dir) / f"rank{rank}.pkl").exists()]
            raise RuntimeError(f"{fn.__name__}: {err}; ranks that had returned their result before it: "
                               f"{returned or 'none'} (the stderr above holds the dying rank's Python stacks)") from err
        payloads = [pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]
        # Every failed rank's traceback: the first rank's is often only "connection closed by peer", the
        # consequence of another rank's error.
        errors = [f"rank {rank} failed:\n{value}" for rank, (status, value) in enumerate(payloads) if status == "error"]
        if errors:
            raise RuntimeError("\n".join(errors))
        return [value for _, value in payloads]
