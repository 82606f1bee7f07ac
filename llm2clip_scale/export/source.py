"""The checkpoint an export reads: which step directory, which stage, the run's config, and whether every input the
export needs is present and intact — all checked before anything is written, each problem phrased as what is wrong
and how to fix it (the CLI prints it as one line and exits 2).

Plain filesystem and OmegaConf code: no torch.distributed, no model building.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm2clip_scale.checkpoint import layout
from llm2clip_scale.config.schema import Config

log = logging.getLogger("llm2clip_scale.export")

# The stages a checkpoint can come from, and which of them trained a DeepSpeed engine (saved under vision/).
STAGES = ("llm2clip_cc", "proclip_inherit", "stage2")
ENGINE_STAGES = ("stage2", "proclip_inherit")
ENGINE_TAG = "vision"  # checkpoint/manager.py: engine.save_checkpoint(tag="vision")
LORA_FILE, ADAPTER_CONFIG_FILE = layout.LORA_FILE, layout.ADAPTER_CONFIG_FILE


class ExportError(RuntimeError):
    """An input problem the user can fix (missing or corrupt checkpoint, missing base weights, occupied output)."""


@dataclass(frozen=True)
class CheckpointSource:
    """One complete step directory and what it was trained as."""

    path: Path  # the step directory
    step: int
    stage: str
    manifest: dict
    cfg: Config

    @property
    def layout(self) -> dict:
        return dict(self.manifest.get("layout") or {})

    @property
    def has_engine(self) -> bool:
        """A DeepSpeed part (vision tower and/or adapter, logit scale) was trained and saved."""
        return self.stage in ENGINE_STAGES

    @property
    def has_vision(self) -> bool:
        return self.stage == "stage2"

    @property
    def has_trained_lora(self) -> bool:
        """This checkpoint holds LLM LoRA matrices it trained: stage 1, or stage 2 with ``model.llm.lora_rank > 0``."""
        return LORA_FILE in (self.manifest.get("files") or {})

    @property
    def lora_paths(self) -> list[Path]:
        """The LoRAs merged into the exported LLM, in the order training applied them: ``model.llm.lora_init`` (a
        stage-1 LoRA merged when the tower was built), then the one this checkpoint trained (held unmerged)."""
        lora_init = self.lora_init_file
        return ([lora_init] if lora_init else []) + ([self.path / LORA_FILE] if self.has_trained_lora else [])

    @property
    def lora_init_file(self) -> Path | None:
        """The stage-1 LoRA file the run merged: as its checkpoints recorded it (a root's ``latest`` moves on), unless
        ``--set model.llm.lora_init`` points elsewhere."""
        lora_init = self.cfg.model.llm.lora_init
        if not lora_init or self.stage == "llm2clip_cc":
            return None
        record = self.manifest.get("lora_init")
        if record and record.get("path") == lora_init:
            return Path(record["file"])
        return Path(lora_init)


def resolve_step_dir(path: str | Path, step: int | None = None) -> Path:
    """The step directory that ``path`` (a step directory or a checkpoint root) and ``--step`` name."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint; give a step directory (…/step<N>) or a checkpoint root "
                          f"holding '{layout.LATEST}'")
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory; give a step directory (…/step<N>) or a checkpoint root")
    is_step_dir = (path / layout.MANIFEST).is_file()
    if step is not None:
        if is_step_dir:
            if path.name != f"step{step}":
                raise ExportError(f"--step {step}: {path} is the directory of another step; pass the checkpoint root "
                                  "or drop --step")
            return path
        target = layout.step_dir(path, step)
        if not (target / layout.MANIFEST).is_file():
            steps = [s for s, _ in layout.complete_checkpoints(path)]
            raise ExportError(f"--step {step}: {target} is not a complete checkpoint; complete steps under {path}: "
                              f"{steps or 'none'}")
        return target
    if is_step_dir:
        return path
    pointer = path / layout.LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if not (target / layout.MANIFEST).is_file():
            raise ExportError(f"{pointer} names {target.name}, which is not a complete checkpoint (no "
                              f"{layout.MANIFEST}); pass a complete step directory or --step N")
        return target
    if path.name.startswith("step") or path.name.startswith(".step"):
        raise ExportError(f"{path}: no {layout.MANIFEST}; this save did not finish — export an earlier step "
                          "directory")
    complete = layout.complete_checkpoints(path)
    hint = f"; complete steps here: {[s for s, _ in complete]} (use --step N)" if complete else ""
    raise ExportError(f"{path}: no '{layout.LATEST}' and no {layout.MANIFEST}, so not a checkpoint root or step "
                      f"directory{hint}")


def config_from_manifest(manifest: dict, where: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's Config from the manifest's plain dict (new schema fields take their defaults), plus ``--set``."""
    recorded = manifest.get("config")
    if not isinstance(recorded, dict):
        raise ExportError(f"{where / layout.MANIFEST}: holds no run config; this checkpoint predates recorded "
                          "configs and cannot be exported")
    try:
        layers = [OmegaConf.create(recorded)]
        for item in overrides:
            if "=" not in item:
                raise ExportError(f"--set {item!r}: expected dotted.key=value, e.g. model.llm.tokenizer=/path")
            layers.append(OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), *layers))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ExportError(f"{where / layout.MANIFEST}: its config does not fit this version's schema at {key} "
                          f"({str(err).splitlines()[0]}); export with the code version that trained it") from None
    assert isinstance(cfg, Config)
    return cfg


def open_checkpoint(path: str | Path, step: int | None = None, overrides: list[str] | tuple[str, ...] = (),
                    verify_checksums: bool = True) -> CheckpointSource:
    """Resolve, read and check a checkpoint for export; raise ExportError naming the first problem and its fix."""
    directory = resolve_step_dir(path, step)
    try:
        manifest = layout.read_manifest(directory)
    except layout.CheckpointError as err:
        raise ExportError(str(err)) from None
    stage = manifest.get("stage")
    if stage not in STAGES:
        raise ExportError(f"{directory / layout.MANIFEST}: stage {stage!r} unknown; this converter exports "
                          f"{', '.join(STAGES)}")
    cfg = config_from_manifest(manifest, directory, overrides)
    source = CheckpointSource(directory, int(manifest.get("step", -1)), stage, manifest, cfg)
    _check_parts(source, verify_checksums)
    _check_base_model(source)
    if source.lora_init_file is not None:  # pin the recorded file for the export and the reference model alike
        cfg.model.llm.lora_init = str(source.lora_init_file)
    return source


def _check_parts(source: CheckpointSource, verify_checksums: bool) -> None:
    """The files this export reads exist, and match the sizes and checksums the manifest recorded."""
    files = source.manifest.get("files") or {}
    wanted = [name for name in files if name.startswith(f"{ENGINE_TAG}/")] if source.has_engine else []
    trains_lora = source.stage == "llm2clip_cc" or (source.stage == "stage2" and source.cfg.model.llm.lora_rank > 0)
    if trains_lora or LORA_FILE in files:
        wanted += [LORA_FILE, ADAPTER_CONFIG_FILE]
        missing = [name for name in (LORA_FILE, ADAPTER_CONFIG_FILE) if name not in files]
        if missing:
            raise ExportError(f"{source.path}: the manifest lists no {', '.join(missing)}, but this run trained an "
                              "LLM LoRA (model.llm.lora_rank > 0) and keeps it there — export a checkpoint written by "
                              "this version")
    if source.has_engine and not wanted:
        raise ExportError(f"{source.path}: the manifest lists no {ENGINE_TAG}/ files, but a {source.stage} "
                          "checkpoint holds its trained weights there; the checkpoint is incomplete")
    problems = layout.verify_files(source.path, sorted(wanted)) if verify_checksums else [
        f"{source.path / name}: missing" for name in wanted if not (source.path / name).is_file()]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"checkpoint corrupt: {problems[0]}{more}; export an earlier step directory (--step N) "
                          "or restore the file")


def _check_base_model(source: CheckpointSource) -> None:
    """The frozen LLM is not in stage-2 checkpoints: its weights, tokenizer and any stage-1 LoRA must be found."""
    llm = source.cfg.model.llm
    fix = "run from the directory the training ran in, or pass --set model.llm.{field}=PATH"
    if not llm.tokenizer or not Path(llm.tokenizer).is_dir():
        raise ExportError(f"model.llm.tokenizer: {llm.tokenizer or '(empty)'} (from the checkpoint's config) is not "
                          f"a tokenizer directory; {fix.format(field='tokenizer')}")
    if llm.hf_checkpoint is not None:
        base = Path(llm.hf_checkpoint)
        if not (base / "config.json").is_file() or not (
            (base / "model.safetensors").is_file() or (base / "model.safetensors.index.json").is_file()
        ):
            raise ExportError(f"model.llm.hf_checkpoint: {base} holds no HuggingFace safetensors checkpoint "
                              f"(config.json + model.safetensors[.index.json]); {fix.format(field='hf_checkpoint')}")
    lora = source.lora_init_file
    record = source.manifest.get("lora_init")
    if lora is not None and record and Path(record["file"]) == lora:
        if not lora.is_file():
            raise ExportError(f"model.llm.lora_init: {lora}, the stage-1 LoRA this run merged, is missing; "
                              f"{fix.format(field='lora_init')}")
        if layout.sha256_file(lora) != record["sha256"]:
            raise ExportError(f"model.llm.lora_init: {lora} changed since this run merged it (sha256 differs); "
                              f"{fix.format(field='lora_init')}")
    elif lora is not None:
        try:
            lora_file = layout.resolve_lora_path(lora)
        except FileNotFoundError:
            lora_file = lora / LORA_FILE
        if not lora_file.is_file() or not lora_file.with_name(ADAPTER_CONFIG_FILE).is_file():
            raise ExportError(f"model.llm.lora_init: {lora} holds no {LORA_FILE} with its {ADAPTER_CONFIG_FILE} "
                              f"(the stage-1 LoRA stage 2 ran with); {fix.format(field='lora_init')}")
        if lora.is_dir() and (lora / layout.LATEST).is_file():
            # The run's config names a root, and its 'latest' may have moved on since stage 2 was trained; the
            # checkpoint does not record which step it merged, so say which one this export takes.
            log.warning("model.llm.lora_init names the checkpoint root %s: merging its current latest, %s (pass "
                        "--set model.llm.lora_init=<step dir> if stage 2 was trained with another step)", lora,
                        lora_file.parent.name)
        if (lora_file.parent / layout.MANIFEST).is_file():  # inside a stage-1 step directory: check it too
            problems = layout.verify_files(lora_file.parent, [LORA_FILE, ADAPTER_CONFIG_FILE])
            if problems:
                raise ExportError(f"model.llm.lora_init corrupt: {problems[0]}; point lora_init (--set) at an intact "
                                  "stage-1 step directory")


def read_adapter_config(lora_file: Path) -> dict:
    """:func:`llm2clip_scale.checkpoint.layout.read_adapter_config`, its failures as ExportError."""
    try:
        return layout.read_adapter_config(lora_file)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(str(err)) from None
