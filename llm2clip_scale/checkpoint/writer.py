"""Background writing of one rank's checkpoint files: the step loop continues while they are written.

A save is cut in two. At the step boundary the state is *snapshotted* (tensors copied to host memory, which is the
only part that stalls training) and the writes are queued; a single background thread then serialises them and
checksums every file. At most one save is in flight: the next save, or the end of the run, waits for it first.

DeepSpeed writes through its ``CheckpointEngine`` interface; :class:`DeferredCheckpointEngine` plugs into it and
turns every ``torch.save`` of ``engine.save_checkpoint`` into a snapshot plus a queued write, so the engine's own
ZeRO-partitioned layout (and its loader) are kept as they are.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from llm2clip_scale.checkpoint.layout import file_record

Write = Callable[[Path], None]


def cpu_snapshot(obj: object, buffers: list[torch.Tensor] | None = None) -> object:
    """A deep copy of ``obj`` whose tensors are host copies (training may overwrite the originals at once).

    With ``buffers`` (the host tensors of the previous snapshot of the same file, in traversal order) matching
    tensors are copied into them instead of into fresh allocations: filling memory that is already mapped is
    several times faster than allocating it, and with one save in flight the previous snapshot is written by now.
    """
    pool = iter(list(buffers)) if buffers is not None else iter(())
    taken: list[torch.Tensor] = []

    def copy(value: object) -> object:
        if isinstance(value, torch.Tensor):
            source = value.detach()
            target = next(pool, None)
            if target is None or target.shape != source.shape or target.dtype != source.dtype:
                target = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
            target.copy_(source)
            taken.append(target)
            return target
        if isinstance(value, dict):
            items = [(key, copy(item)) for key, item in value.items()]
            return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
        if isinstance(value, list):
            return [copy(item) for item in value]
        if isinstance(value, torch.Size):  # a tuple subclass DeepSpeed's zero_to_fp32 calls .numel() on
            return value
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(copy(item) for item in value)
        return value

    snapshot = copy(obj)
    if buffers is not None:
        buffers[:] = taken
    if any(t.is_pinned() for t in taken):
        torch.cuda.synchronize()  # pinned copies from the GPU are asynchronous
    return snapshot


class PendingFiles:
    """The files one rank contributes to one save: queued writes, plus files already on disk to checksum."""

    def __init__(self, root: Path, buffers: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.root = root
        self.buffers = buffers if buffers is not None else {}  # host buffers by file, reused across saves
        self.writes: list[tuple[Path, Write]] = []
        self.written: list[Path] = []
        self._lock = threading.Lock()

    def add(self, path: str | Path, write: Write) -> None:
        with self._lock:
            self.writes.append((Path(path), write))

    def add_torch(self, path: str | Path, obj: object) -> None:
        snapshot = cpu_snapshot(obj, self.buffers.setdefault(Path(path).relative_to(self.root).as_posix(), []))
        self.add(path, lambda target: torch.save(snapshot, target))

    def add_written(self, paths: list[Path]) -> None:
        self.written.extend(paths)

    def run(self) -> dict[str, dict]:
        """Write everything queued, then checksum it all: ``{relative path: {size, sha256}}``."""
        for path, write in self.writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            write(partial)
            partial.replace(path)
        paths = [path for path, _ in self.writes] + self.written
        return dict(file_record(path, self.root) for path in paths)


class BackgroundWriter:
    """One worker thread; ``submit`` returns a future of the file records, ``synchronous`` writes inline."""

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer") if asynchronous else None

    def submit(self, files: PendingFiles) -> Future:
        if self._pool is not None:
            return self._pool.submit(files.run)
        future: Future = Future()
        try:
            future.set_result(files.run())
        except BaseException as err:  # noqa: BLE001 - handed to the commit step, which reports it on every rank
            future.set_exception(err)
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class DeferredCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, except that ``save`` snapshots and queues instead of writing.

    Installed on an engine by :func:`install_deferred_engine`; ``pending`` is pointed at the current save's
    :class:`PendingFiles` by the checkpoint manager before each ``engine.save_checkpoint``. Loading is unchanged.
    """

    def __init__(self) -> None:
        super().__init__(None)
        self.pending: PendingFiles | None = None

    def preserves_storage_sharing(self) -> bool:
        return False  # our snapshot already copies each tensor compactly; DeepSpeed need not clone first

    def save(self, state_dict: object, path: str) -> None:
        if self.pending is None:
            super().save(state_dict, path)
        else:
            self.pending.add_torch(path, state_dict)


def install_deferred_engine(engine: object) -> DeferredCheckpointEngine:
    deferred = DeferredCheckpointEngine()
    engine.checkpoint_engine = deferred
    return deferred
