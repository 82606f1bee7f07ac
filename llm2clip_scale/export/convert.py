"""One export, start to finish: check inputs, write the folders into ``OUT.partial``, verify, rename to ``OUT``.

Order matters for memory: the LLM streams shard by shard (never whole); the DeepSpeed state is consolidated once
and feeds the timm folder, the adapter files and the reference model; the reference models are freed and the
consolidated state dropped before the verifier process loads the export, so no step holds a model twice.
Everything cheap to check (arguments, output directory, checkpoint files and checksums, base weights) is checked
before anything heavy is imported or written.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm2clip_scale.export.shards import parse_size
from llm2clip_scale.export.source import CheckpointSource, ExportError, open_checkpoint

log = logging.getLogger("llm2clip_scale.export")

DTYPES = ("float32", "bfloat16")
# Relative tolerance of the verifier by export dtype: fp32 outputs agree to float rounding over differently ordered
# kernels; bf16 weights carry 2^-9 relative rounding each, which a few layers turn into up to ~1% in the outputs
# (the reference stays fp32, the bf16 export is upcast on loading).
TOLERANCES = {"float32": 1e-5, "bfloat16": 3e-2}
VERIFY_SCRIPT = Path(__file__).with_name("verify_export.py")
MODELING_TEMPLATE = Path(__file__).with_name("modeling_llm2clip.py")


class VerificationError(RuntimeError):
    """The reloaded export does not reproduce the training-time model (or the verifier could not run)."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


def check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir}: exists and is not empty; choose another OUT_DIR or pass --force to replace it")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    shard_size: str = "2GB",
    verify: bool = True,
    force: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    keep_reference: str | Path | None = None,
) -> dict:
    """Export ``checkpoint`` (a step directory or a root with ``latest``) to ``out_dir``; return export.json's record.

    ``keep_reference``: also save the verifier's inputs and reference outputs there (to rerun verify_export.py).
    Raises ExportError for input problems (nothing is written), VerificationError when the export does not
    reproduce the training-time model (it is left in ``OUT.partial`` for inspection).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: unsupported; use one of {', '.join(DTYPES)}")
    try:
        max_shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise ExportError(f"--shard-size: {err}") from None
    out = Path(out_dir)
    check_output_dir(out, force)
    source = open_checkpoint(checkpoint, step, overrides)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    record = _write(source, partial, dtype, max_shard_bytes, verify, keep_reference)
    record["seconds"] = round(time.perf_counter() - started, 2)
    from llm2clip_scale.export.card import file_records, model_card

    (partial / "README.md").write_text(model_card(source, record))
    record["files"] = file_records(partial)
    (partial / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if out.exists():
        shutil.rmtree(out)  # --force (checked above)
    partial.rename(out)
    log.info("export complete: %s", out)
    return record


def _write(source: CheckpointSource, partial: Path, dtype_name: str, max_shard_bytes: int, verify: bool,
           keep_reference: str | Path | None) -> dict:
    import torch

    from llm2clip_scale.export import vision as vision_export
    from llm2clip_scale.export.reference import text_max_length
    from llm2clip_scale.export.verify_export import fingerprint

    cfg, dtype = source.cfg, getattr(torch, dtype_name)
    fingerprints: dict[str, dict[str, list[float]]] = {"text": {}, "vision": {}, "vision_hf": {}}
    record: dict = {"format": 1, "exporter": "llm2clip_scale tools/convert_to_hf.py", "checkpoint": str(source.path),
                    "step": source.step, "stage": source.stage, "layout": source.layout, "dtype": dtype_name,
                    "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "config": source.manifest.get("config")}

    engine_state = parts = None
    if source.has_engine:
        log.info("consolidating the DeepSpeed state of %s (ZeRO-%s)", source.path, source.layout.get("zero_stage"))
        engine_state = vision_export.consolidate_engine_state(source.path, int(source.layout.get("zero_stage", 0)))
        parts = vision_export.split_engine_state(engine_state)
    adapter_state = parts["adapter"] if parts else {}
    scalars = parts["scalars"] if parts else {}

    # ---- text: the LLM (+ LoRA), the adapter and the logit scale, as one transformers model
    text_settings = _text_settings(source, adapter_state, scalars, text_max_length(cfg))

    def remember(name: str, tensor: torch.Tensor) -> None:
        fingerprints["text"][name] = fingerprint(tensor)

    record["text"] = _write_text(source, partial / "text", text_settings, adapter_state, scalars, dtype,
                                 max_shard_bytes, remember)
    if "logit_scale" in scalars:
        raw = float(scalars["logit_scale"].reshape(-1)[0])
        record["logit_scale"] = {"value": raw, "exp": float(torch.tensor(min(raw, cfg.model.logit_scale_max)).exp()),
                                 "max": cfg.model.logit_scale_max}
    if "logit_bias" in scalars:
        record["logit_bias"] = float(scalars["logit_bias"].reshape(-1)[0])

    # ---- vision: timm folder + preprocessing
    if source.has_vision:
        tower_state, merged = vision_export.merge_vision_lora(parts["vision"], cfg.model.vision)
        model = vision_export.build_timm_classifier(cfg.model.vision, cfg.model.embed_dim, tower_state)
        (partial / "vision").mkdir()
        saved = vision_export.write_timm_folder(model, cfg.model.vision, cfg, partial / "vision", dtype,
                                                tag=f"llm2clip_step{source.step}")
        fingerprints["vision"] = {name: fingerprint(value) for name, value in saved.items()}
        # Where transformers has the trunk's architecture (OpenAI-style CLIP, SigLIP), a transformers copy too.
        from llm2clip_scale.export.vision_hf import write_transformers_vision

        vision_hf = write_transformers_vision(
            model, partial / "vision_hf", dtype,
            on_tensor=lambda name, tensor: fingerprints["vision_hf"].__setitem__(name, fingerprint(tensor)))
        if "skipped" in vision_hf:
            log.info("vision: no transformers copy (%s)", vision_hf["skipped"])
        else:  # AutoImageProcessor.from_pretrained(OUT/vision_hf) works as well
            (partial / "vision_hf" / "preprocessor_config.json").write_text(
                json.dumps(vision_export.preprocessor_config(cfg), indent=2) + "\n")
        record["vision_hf"] = vision_hf
        del model, saved, tower_state
        (partial / "preprocessor_config.json").write_text(
            json.dumps(vision_export.preprocessor_config(cfg), indent=2) + "\n")
        record["vision"] = {"architecture": cfg.model.vision.name, "image_size": cfg.model.vision.image_size,
                            "num_classes": cfg.model.embed_dim, "lora_merged_linears": merged}

    # ---- the raw pieces: adapter.safetensors (fp32, loadable as model.adapter_init) and clip_config.json
    if adapter_state:
        _write_adapter(partial, cfg, adapter_state, record)
        record["adapter"] = text_settings["adapter"]

    if not verify:
        record["verification"] = None
        return record
    from llm2clip_scale.export import reference as ref

    log.info("building the training-time model for verification")
    cases = ref.tokenized_cases(cfg)
    ref.llm_reference(source, cases)
    clip = ref.clip_reference(source, engine_state, cases) if engine_state is not None else {}
    reference = {"format": 1, "tolerance": TOLERANCES[dtype_name], "text_cases": cases,
                 "fingerprints": fingerprints, "vision": clip.get("vision"),
                 "logit_scale": clip.get("logit_scale"), "logit_bias": clip.get("logit_bias")}
    if reference["vision"] is not None:
        reference["vision"]["image_mean"] = torch.tensor(cfg.data.image_mean, dtype=torch.float64)
        reference["vision"]["image_std"] = torch.tensor(cfg.data.image_std, dtype=torch.float64)
    del engine_state, parts, adapter_state, scalars, clip
    gc.collect()  # the verifier loads the export next; the training-side tensors must be gone by then
    if keep_reference is not None:
        torch.save(reference, keep_reference)
    record["verification"] = run_verifier(partial, reference)
    return record


def _text_settings(source: CheckpointSource, adapter_state: dict, scalars: dict, max_length: int) -> dict:
    """The ``llm2clip`` section of text/config.json, read by modeling_llm2clip.py."""
    cfg = source.cfg
    llm, adapter = cfg.model.llm, cfg.model.adapter
    return {
        "bidirectional": llm.bidirectional,
        "pooling": "mean",
        "caption_format": llm.caption_format,
        "max_length": max_length,
        "training_instruction": llm.instruction,
        "adapter": {"input_dim": adapter.input_dim, "num_blocks": adapter.num_blocks, "expansion": adapter.expansion,
                    "embed_dim": cfg.model.embed_dim, "layernorm_eps": 1e-5} if adapter_state else None,
        "logit_scale": float(scalars["logit_scale"].reshape(-1)[0]) if "logit_scale" in scalars else None,
        "logit_scale_max": cfg.model.logit_scale_max,
        "logit_bias": float(scalars["logit_bias"].reshape(-1)[0]) if "logit_bias" in scalars else None,
        "source": {"checkpoint": str(source.path), "step": source.step, "stage": source.stage},
    }


def _write_text(source: CheckpointSource, text_dir: Path, settings: dict, adapter_state: dict, scalars: dict,
                dtype, max_shard_bytes: int, on_tensor) -> dict:
    from llm2clip_scale.checkpoint.layout import resolve_lora_path
    from llm2clip_scale.data.samples import load_tokenizer
    from llm2clip_scale.export.text import LoRAFactors, hf_text_config, model_type_of, write_text_weights

    llm = source.cfg.model.llm
    loras = [LoRAFactors(resolve_lora_path(path)) for path in source.lora_paths]
    settings["lora"] = [lora.describe() for lora in loras]
    text_dir.mkdir()
    tokenizer = load_tokenizer(llm.tokenizer)  # with the pad token training used (eos for Llama-family tokenizers)
    tokenizer.save_pretrained(str(text_dir))
    config = hf_text_config(llm, tokenizer, dtype, settings)
    (text_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(MODELING_TEMPLATE, text_dir / MODELING_TEMPLATE.name)
    extra = {f"adapter.{name}": value for name, value in adapter_state.items()}
    extra.update({name: value.reshape(1) for name, value in scalars.items()})
    log.info("writing the LLM%s to %s", f" with {len(loras)} LoRA(s) merged" if loras else "", text_dir)
    weight_map = write_text_weights(llm, loras, extra, text_dir, dtype, max_shard_bytes, on_tensor)
    return {"architecture": config["architectures"][0], "model_type": model_type_of(llm),
            "weights": len(weight_map), "shards": len(set(weight_map.values())), "max_length": settings["max_length"],
            "caption_format": llm.caption_format, "lora": settings["lora"]}


def _write_adapter(partial: Path, cfg, adapter_state: dict, record: dict) -> None:
    from safetensors.torch import save_file

    from llm2clip_scale.models.warm_start import ADAPTER_META_KEY

    adapter = cfg.model.adapter
    meta = {"input_dim": adapter.input_dim, "num_blocks": adapter.num_blocks, "expansion": adapter.expansion,
            "embed_dim": cfg.model.embed_dim, "source": record["checkpoint"], "step": record["step"]}
    tensors = {name: value.float().contiguous() for name, value in adapter_state.items()}
    save_file(tensors, str(partial / "adapter.safetensors"), metadata={ADAPTER_META_KEY: json.dumps(meta)})
    clip_config = {
        "embed_dim": cfg.model.embed_dim,
        "adapter": {k: meta[k] for k in ("input_dim", "num_blocks", "expansion", "embed_dim")},
        "logit_scale": (record.get("logit_scale") or {}).get("value"),
        "logit_scale_exp": (record.get("logit_scale") or {}).get("exp"),
        "logit_scale_max": cfg.model.logit_scale_max,
        "logit_bias": record.get("logit_bias"),
        "text_model": "text",
        "vision_model": "vision" if (partial / "vision").is_dir() else None,
        "image_size": cfg.model.vision.image_size if (partial / "vision").is_dir() else None,
    }
    (partial / "clip_config.json").write_text(json.dumps(clip_config, indent=2) + "\n")


def run_verifier(export_dir: Path, reference: dict) -> dict:
    """Run verify_export.py by path in a fresh process on ``export_dir``; its report, or VerificationError."""
    import torch

    with tempfile.TemporaryDirectory(prefix="llm2clip_verify_") as tmp:
        reference_file = Path(tmp) / "reference.pt"
        torch.save(reference, reference_file)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               # A private module cache: transformers copies modeling_llm2clip.py there; a stale copy from another
               # export of the same folder name must not be what gets checked.
               "HF_MODULES_CACHE": str(Path(tmp) / "hf_modules")}
        command = [sys.executable, str(VERIFY_SCRIPT), str(export_dir), str(reference_file)]
        log.info("verifying: %s", " ".join(command))
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    report = _last_json_line(proc.stdout)
    if proc.returncode != 0 or report is None or not report.get("passed"):
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise VerificationError(f"{detail} (verifier exit status {proc.returncode}); the export is left in "
                                f"{export_dir} for inspection", report)
    summary = {key: report[key] for key in ("passed", "tolerance", "weight_tolerance", "max_rel_error",
                                            "max_weight_error", "worst", "compared", "standalone")}
    summary["outputs"] = {k: v for k, v in report["errors"].items() if not k.startswith("weight ")}
    return summary


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _versions() -> dict[str, str]:
    from llm2clip_scale.checkpoint.manager import library_versions

    return dict(library_versions())
