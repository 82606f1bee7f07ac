"""The checkpoint directory layout: names, completeness, the ``latest`` pointer, checksums, pruning, resume lookup.

Plain filesystem code (no torch.distributed), so it serves the loop, ``llm2clip-scale inspect`` and tests alike::

    <checkpoint.dir>/
      latest                 "step<N>": the newest complete checkpoint, replaced atomically, written last
      step<N>/               one directory per saved step, visible only once complete
        manifest.json        step, layout, config, versions, and size + sha256 of every other file (written last)
        vision/              DeepSpeed checkpoint of the trainable vision side (ZeRO-sharded), when the stage has one
        llm/                 megatron-core dist_checkpointing of the LLM's trained weights + optimizer, when it trains
        train_state/rank<R>.pt   step, RNG states, data-loader position of every worker, skip counters, …
        shared/              tensors identical on every rank (e.g. the EMA teacher), written once
      .step<N>.tmp/          a save in progress (or killed mid-way): never read, removed by the next run

A checkpoint is complete when its directory has its final name and its manifest; the rename happens only after
every rank's files are written and checksummed, so a crash at any point leaves the previous checkpoint as the
newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("llm2clip_scale.checkpoint")

LATEST = "latest"
LORA_FILE = "lora.safetensors"  # an LLM LoRA as one TP/PP-independent file (checkpoint/lora.py writes it)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # its rank, alpha, targets and base model
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step(\d+)$")
_TMP_DIR = re.compile(r"^\.step(\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, corrupt, or written for an incompatible run."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step{step}"


def tmp_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".step{step}.tmp"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, root: Path) -> tuple[str, dict]:
    """(path relative to ``root``, {size, sha256}) of one written file."""
    return path.relative_to(root).as_posix(), {"size": path.stat().st_size, "sha256": sha256_file(path)}


def list_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def incomplete_checkpoints(root: str | Path) -> list[Path]:
    """Saves that never finished: temporary directories, and step directories without a manifest."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        child for child in root.iterdir()
        if child.is_dir() and (_TMP_DIR.match(child.name) or (_STEP_DIR.match(child.name)
                                                              and not (child / MANIFEST).is_file()))
    )


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the save did not finish (or this is not a checkpoint)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None


def verify_files(directory: str | Path, names: list[str] | None = None) -> list[str]:
    """Problems of the files the manifest lists (all, or just ``names``): missing, wrong size, wrong checksum."""
    directory = Path(directory)
    files = read_manifest(directory)["files"]
    problems = []
    for name in names if names is not None else sorted(files):
        expected = files[name]
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: checksum differs from the manifest (corrupt)")
    return problems


def resolve_checkpoint(setting: str, root: str | Path) -> Path | None:
    """The checkpoint ``train.resume`` names: None for ``none`` (or ``auto`` with nothing saved yet).

    ``auto`` takes the newest complete checkpoint under ``root`` and warns about newer incomplete ones. An explicit
    path may be a step directory or a checkpoint root (its ``latest``); one that is missing or incomplete is an error.
    Checksums are verified by the loader (in parallel over ranks), not here.
    """
    if setting == "none":
        return None
    if setting == "auto":
        complete = complete_checkpoints(root)
        newest = complete[-1][0] if complete else -1
        for path in incomplete_checkpoints(root):
            step = int(re.sub(r"\D", "", path.name) or -1)
            if step > newest:
                log.warning("resume=auto: ignoring incomplete checkpoint %s (the save did not finish)", path)
        return complete[-1][1] if complete else None
    path = Path(setting)
    if (path / LATEST).is_file() and not (path / MANIFEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"train.resume: {setting} is not a checkpoint directory (nor a root with '{LATEST}')")
    read_manifest(path)  # raises naming the missing manifest
    return path


def commit(tmp: Path, final: Path) -> None:
    """Make a finished save visible: rename its directory, then point ``latest`` at it (both atomic)."""
    if final.exists():  # a stale copy of the same step, e.g. from a run that was resumed before this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = final.parent / f".{LATEST}.tmp"
    pointer.write_text(f"{final.name}\n")
    os.replace(pointer, final.parent / LATEST)
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep_last`` (0 keeps all); never the newest. Returns them."""
    complete = complete_checkpoints(root)
    if keep_last <= 0 or len(complete) <= keep_last:
        return []
    doomed = [path for _, path in complete[: len(complete) - max(keep_last, 1)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale_saves(root: str | Path) -> list[Path]:
    """Delete the temporary directories of saves that were killed (run at start-up, before the first save)."""
    stale = [p for p in incomplete_checkpoints(root) if _TMP_DIR.match(p.name)]
    for path in stale:
        log.warning("removing the unfinished save %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def describe(path: str | Path, verify: bool = True) -> dict:
    """What ``llm2clip-scale inspect`` prints: step, stage, layout, config, files and integrity of one checkpoint."""
    path = Path(path)
    if (path / LATEST).is_file() and not (path / MANIFEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    manifest = read_manifest(path)
    files = manifest["files"]
    report = {
        "path": str(path),
        "step": manifest["step"],
        "stage": manifest.get("stage"),
        "layout": manifest.get("layout"),
        "samples_seen": manifest.get("samples_seen"),
        "versions": manifest.get("versions"),
        "parts": sorted({name.split("/")[0] for name in files}),
        "num_files": len(files),
        "bytes": sum(f["size"] for f in files.values()),
        "config": manifest.get("config"),
    }
    if verify:
        problems = verify_files(path)
        report["integrity"] = "ok" if not problems else "corrupt"
        report["problems"] = problems
    return report


def resolve_lora_path(path: str | Path) -> Path:
    """A LoRA file from a file path, a step directory, or a checkpoint root holding ``latest``."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip() / LORA_FILE
    raise FileNotFoundError(f"{path}: no {LORA_FILE}, step directory or checkpoint root with '{LATEST}'")


def read_adapter_config(lora_file: Path) -> dict:
    """The ``adapter_config.json`` beside a ``lora.safetensors``: the rank, alpha and targets it was trained with (an
    MNTP run's file is of rank 2r). Raises FileNotFoundError when absent, ValueError when unreadable. One reader for
    training, stage chaining and the exporter (which imports no megatron, hence here)."""
    meta_file = lora_file.with_name(ADAPTER_CONFIG_FILE)
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: missing beside {lora_file.name}; it records the LoRA rank, alpha and "
                                "targets the matrices were trained with")
    try:
        meta = json.loads(meta_file.read_text())
        meta["lora_rank"], meta["lora_alpha"] = int(meta["lora_rank"]), float(meta["lora_alpha"])
        meta["lora_targets"] = list(meta["lora_targets"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_file}: unreadable LoRA settings ({type(err).__name__}: {err}); it must record "
                         "lora_rank, lora_alpha and lora_targets") from None
    return meta


def lora_settings_mismatch(step_dir: Path, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """How the LoRA settings a step directory was trained with differ from ``rank``/``alpha``/``targets`` (empty: they
    agree, or the directory holds no LLM LoRA). The scaling alpha/r lives in no tensor, so resuming under another
    alpha would silently train a different model; a stage-1 MNTP checkpoint records MNTP + SimCSE stacked (2r, 2 alpha).
    """
    if not (step_dir / ADAPTER_CONFIG_FILE).is_file():
        return []
    meta = read_adapter_config(step_dir / LORA_FILE)
    stacked = 2 if "mntp" in meta else 1
    saved = {"lora_rank": meta["lora_rank"] // stacked, "lora_alpha": meta["lora_alpha"] / stacked,
             "lora_targets": sorted(meta["lora_targets"])}
    wanted = {"lora_rank": rank, "lora_alpha": float(alpha), "lora_targets": sorted(targets)}
    return [f"model.llm.{key}={wanted[key]} but the checkpoint was trained with {saved[key]}"
            for key in saved if saved[key] != wanted[key]]


def lora_init_record(lora_init: str | None) -> dict | None:
    """Which stage-1 LoRA ``model.llm.lora_init`` resolves to now, by file and content: a checkpoint root's
    ``latest`` moves on, so the step that stage 2 merged is recorded in its checkpoints (and checked on resume)."""
    if not lora_init:
        return None
    lora_file = resolve_lora_path(lora_init)
    return {"path": lora_init, "file": str(lora_file.resolve()), "sha256": sha256_file(lora_file)}
