"""The one place that saves and loads training state (layout: checkpoint/layout.py).

A save, collective over the world: every rank snapshots its part at a step boundary — the DeepSpeed engine (ZeRO
partitions, optimizer, lr schedule) through a deferred checkpoint engine, the LLM's trained weights through
megatron-core dist_checkpointing, its own train state (RNG, data position, counters), and rank 0 the shared tensors —
into ``.step<N>.tmp``. A background thread writes and checksums the files while training goes on. At a later step
boundary, once every rank reports done (one small all-reduce per step while a save is in flight), rank 0 writes the
manifest, renames the directory to ``step<N>``, points ``latest`` at it and prunes old checkpoints.

A load verifies checksums (files split over ranks), then restores each part. A rank's train state is restored from
the saved rank with the same data-parallel coordinates (``TrainingTask.data_key``); when the layout changed so that
none matches, data streams start afresh with new seeds and a warning — the model and optimizer are still restored.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from llm2clip_scale.checkpoint import layout
from llm2clip_scale.checkpoint.layout import CheckpointError
from llm2clip_scale.checkpoint.reshard import load_engine
from llm2clip_scale.checkpoint.rng import capture_rng
from llm2clip_scale.checkpoint.writer import BackgroundWriter, PendingFiles, cpu_snapshot, install_deferred_engine
from llm2clip_scale.config.schema import Config
from llm2clip_scale.distributed.topology import Topology

log = logging.getLogger("llm2clip_scale.checkpoint")

ENGINE_TAG = "vision"


@dataclass
class _InFlight:
    step: int
    tmp: Path
    future: Future
    manifest: dict
    started: float


@dataclass
class TaskState:
    """The parts of a training task that a checkpoint holds.

    ``engine``: a DeepSpeed engine (vision tower / adapter, optimizer, lr schedule; ZeRO-sharded), saved under
    ``vision/``. ``llm``: the trained LLM side (checkpoint/llm_state.py), saved under ``llm/`` with dist_checkpointing.
    ``shared``: files identical on every rank, written once by rank 0: ``{relative path: tensors}`` as safetensors
    (the EMA teacher, the LoRA adapters as one TP/PP-independent file) or ``{relative path: text}``. ``rank``:
    picklable per-rank state (data-stream position, skip counts, task counters), restored only on a rank with the
    same data coordinates.
    """

    engine: Any = None
    llm: Any = None
    shared: dict[str, dict[str, torch.Tensor] | str] = field(default_factory=dict)
    rank: dict = field(default_factory=dict)


@dataclass
class Restored:
    """What a load hands back: the loop's counters, and this rank's RNG and task state (None after a re-layout,
    when no saved rank had this rank's data coordinates), plus the shared tensors."""

    path: Path
    step: int
    loop: dict
    rng: dict | None
    task_rank: dict | None
    shared: dict[str, dict[str, torch.Tensor]]


@functools.cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import version  # metadata only: importing transformers here would cost seconds

    return {name: version(name) for name in ("torch", "deepspeed", "megatron-core", "transformers", "timm",
                                             "webdataset")}


def layout_of(topo: Topology, cfg: Config) -> dict:
    return {"world_size": topo.world_size, "tensor_parallel": topo.tp_size, "pipeline_parallel": topo.pp_size,
            "llm_data_parallel": topo.llm_dp_size, "zero_stage": cfg.parallel.zero_stage,
            "num_workers": cfg.data.num_workers}


class CheckpointManager:
    def __init__(self, cfg: Config, topo: Topology, stage: str) -> None:
        self.cfg, self.topo, self.stage = cfg, topo, stage
        self.root = Path(cfg.checkpoint.dir)
        self.writer = BackgroundWriter(cfg.checkpoint.async_save)
        self._inflight: _InFlight | None = None
        self._buffers: dict[str, list[torch.Tensor]] = {}  # host snapshot buffers, reused from save to save
        self._config = _plain_config(cfg)
        # The stage-1 LoRA merged into a frozen tower, pinned by file and content.
        self._lora_init = layout.lora_init_record(cfg.model.llm.lora_init)
        self.last_committed: Path | None = None
        if topo.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            layout.remove_stale_saves(self.root)
        dist.barrier()

    # ------------------------------------------------------------------------------------------------------- save

    def save(self, step: int, state: TaskState, loop_state: dict, data_key: tuple, block: bool = False) -> None:
        """Snapshot everything for ``step`` now; the files are written in the background unless ``block``."""
        self.wait()  # at most one save in flight
        started = time.perf_counter()
        tmp = layout.tmp_dir(self.root, step)
        if self.topo.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        files = PendingFiles(tmp, self._buffers)
        if state.engine is not None:
            deferred = install_deferred_engine(state.engine)
            deferred.pending = files
            try:
                state.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
            finally:
                deferred.pending = None
        if state.llm is not None:
            state.llm.save(tmp / "llm")  # synchronous and collective; small (LoRA) or absent in most stages
            dist.barrier()
            if self.topo.is_main:
                files.add_written(layout.list_files(tmp / "llm"))
        files.add_torch(tmp / "train_state" / f"rank{self.topo.rank}.pt", {
            "step": step, "data_key": data_key, "loop": loop_state, "task": state.rank, "rng": capture_rng(),
        })
        if self.topo.is_main:
            for name, content in state.shared.items():
                files.add(tmp / name, _shared_writer(cpu_snapshot(content, self._buffers.setdefault(name, []))))
        keys: list = [None] * self.topo.world_size
        dist.all_gather_object(keys, list(data_key))
        manifest = {
            "step": step, "stage": self.stage, "layout": layout_of(self.topo, self.cfg),
            "samples_seen": loop_state.get("samples_seen"), "rank_data_keys": keys, "shared": sorted(state.shared),
            "versions": library_versions(), "config": self._config, "lora_init": self._lora_init,
        }
        self._inflight = _InFlight(step, tmp, self.writer.submit(files), manifest, started)
        log.debug("step %d: checkpoint snapshot took %.3f s", step, time.perf_counter() - started)
        if block:
            self.wait()

    @property
    def in_flight(self) -> bool:
        """A save is snapshotted but not yet committed."""
        return self._inflight is not None

    def poll(self) -> None:
        """At a step boundary: commit the save in flight if every rank has finished writing it (collective)."""
        if self._inflight is None:
            return
        done = torch.tensor([int(self._inflight.future.done())], dtype=torch.int32, device=self.topo.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if int(done.item()):
            self._commit()

    def wait(self) -> None:
        """Block until the save in flight is written and committed (collective)."""
        if self._inflight is not None:
            self._commit()

    def _commit(self) -> None:
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        try:
            outcome: tuple[str, object] = ("ok", inflight.future.result())
        except Exception as err:  # noqa: BLE001 - reported on every rank below, so no rank waits forever
            outcome = ("error", f"rank {self.topo.rank}: {type(err).__name__}: {err}")
        outcomes: list = [None] * self.topo.world_size
        dist.all_gather_object(outcomes, outcome)
        errors = [detail for status, detail in outcomes if status == "error"]
        if errors:
            raise CheckpointError(f"saving step {inflight.step} failed; the previous checkpoint stays latest: "
                                  + "; ".join(errors))
        final = layout.step_dir(self.root, inflight.step)
        if self.topo.is_main:
            files: dict[str, dict] = {}
            for _, records in outcomes:
                files.update(records)
            for extra in layout.list_files(inflight.tmp):  # small files libraries wrote inline (zero_to_fp32.py)
                if extra.relative_to(inflight.tmp).as_posix() not in files:
                    files.update([layout.file_record(extra, inflight.tmp)])
            manifest = {**inflight.manifest, "files": dict(sorted(files.items()))}
            (inflight.tmp / layout.MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            layout.commit(inflight.tmp, final)
            removed = layout.prune(self.root, self.cfg.checkpoint.keep_last)
            size = sum(record["size"] for record in files.values()) / 2**20
            log.info("checkpoint step %d committed: %s (%.1f MB, %.1f s after the snapshot)%s", inflight.step, final,
                     size, time.perf_counter() - inflight.started,
                     f"; removed {', '.join(p.name for p in removed)}" if removed else "")
        dist.barrier()
        self.last_committed = final

    def close(self) -> None:
        self.wait()
        self.writer.close()

    # ------------------------------------------------------------------------------------------------------- load

    def load(self, path: Path, state: TaskState, data_key: tuple) -> Restored:
        """Restore the engine and LLM parts of ``state`` in place from ``path`` (collective); return the rest."""
        manifest = layout.read_manifest(path)
        if manifest.get("stage") != self.stage:
            raise CheckpointError(f"{path}: written by stage {manifest.get('stage')!r}, this run is {self.stage!r}; "
                                  "point train.resume at a checkpoint of this stage (or use train.resume=none)")
        saved_lora = manifest.get("lora_init")
        if saved_lora and (self._lora_init or {}).get("sha256") != saved_lora["sha256"]:
            raise CheckpointError(f"{path}: trained with the stage-1 LoRA {saved_lora['file']} (sha256 "
                                  f"{saved_lora['sha256'][:12]}…), but model.llm.lora_init now gives "
                                  f"{(self._lora_init or {}).get('file')}; set model.llm.lora_init to that file")
        llm = self.cfg.model.llm
        wrong = layout.lora_settings_mismatch(path, llm.lora_rank, llm.lora_alpha, list(llm.lora_targets))
        if wrong:
            raise CheckpointError(f"{path}: " + "; ".join(wrong) + ". Resume with the LoRA settings the run was "
                                  "started with (or train.resume=none to start afresh)")
        if self.cfg.checkpoint.verify_on_load:
            self._verify(path, manifest)
        saved_layout = manifest["layout"]
        if state.engine is not None:
            load_engine(state.engine, path, ENGINE_TAG, saved_layout["world_size"], self.topo.world_size,
                        saved_layout.get("zero_stage"))
        if state.llm is not None:
            state.llm.load(path / "llm")
        source_rank = _matching_rank(manifest["rank_data_keys"], list(data_key))
        rank_file = path / "train_state" / f"rank{0 if source_rank is None else source_rank}.pt"
        saved = torch.load(rank_file, map_location="cpu", weights_only=False)
        shared = {name: load_file(str(path / name)) for name in manifest["shared"] if name.endswith(".safetensors")}
        if source_rank is None:
            log.warning("resume from %s: the saved layout %s has no rank with this rank's data coordinates %s; "
                        "data streams and RNG start afresh (not bit-exact, by design)", path, saved_layout, data_key)
        matched = source_rank is not None
        return Restored(path, int(manifest["step"]), saved["loop"], saved["rng"] if matched else None,
                        saved["task"] if matched else None, shared)

    def _verify(self, path: Path, manifest: dict) -> None:
        names = sorted(manifest["files"])
        mine = names[self.topo.rank :: self.topo.world_size]
        problems: list = [None] * self.topo.world_size
        dist.all_gather_object(problems, layout.verify_files(path, mine))
        found = [problem for part in problems for problem in part]
        if found:
            raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(found[:10])
                                  + " — resume from an earlier step directory (train.resume=<dir>/step<N>)")


def _shared_writer(content: dict[str, torch.Tensor] | str):
    def write(target: Path) -> None:
        if isinstance(content, str):
            target.write_text(content)
        else:
            save_file({key: value.contiguous() for key, value in content.items()}, str(target))

    return write


def _matching_rank(saved_keys: list, key: list) -> int | None:
    for rank, saved in enumerate(saved_keys):
        if list(saved) == key:
            return rank
    return None


def _plain_config(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
