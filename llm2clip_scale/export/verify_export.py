"""Reload an llm2clip_scale export with stock transformers and timm and compare it with the training-time model.

    python llm2clip_scale/export/verify_export.py OUT_DIR reference.pt [--tolerance T]

``reference.pt`` (written by the converter) holds the sample captions and images, the training-time model's outputs
on them and a fingerprint of every exported weight. This script runs by file path in a fresh process and imports
only torch, transformers and timm — never ``llm2clip_scale`` (checked in ``sys.modules`` at the end) — so a pass
shows that the folders stand alone. It compares, each as max |export - reference| / max |reference|:

- token rows: the export's own ``tokenize`` (the caption format in config.json) against training's, exactly;
- pooled LLM embeddings, CLIP text features and the logit scale / bias;
- image embeddings of ``timm.create_model("local-dir:OUT/vision", pretrained=True)`` fed by transformers'
  CLIPImageProcessor from ``OUT/preprocessor_config.json``, and those pixel values against training's transform;
- every weight as transformers / timm loaded it: a fingerprint (sum, absolute sum, position-weighted sum, in fp64)
  against the one taken while writing it, relative to its absolute sum — this names a damaged tensor directly.

Prints one JSON line (passed, max_rel_error, worst, errors); exits 1 naming the worst comparison when any is beyond
the tolerance (the reference's: 1e-5 for float32 exports), 3 if llm2clip_scale was imported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

WEIGHT_TOLERANCE = 1e-9  # written and reloaded weights are bit copies; only the fp64 summation order differs
_FINGERPRINT_CHUNK = 1 << 22


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """[sum, sum |x|, sum x * w(position)] in fp64, chunked so a 4 GB embedding needs no 4 GB of weights."""
    flat = tensor.detach().reshape(-1)
    total, absolute, weighted = 0.0, 0.0, 0.0
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        chunk = flat[start : start + _FINGERPRINT_CHUNK].double()
        position = torch.arange(start, start + chunk.numel(), dtype=torch.float64)
        # A fixed irrational stride: a permuted or transposed tensor gets another weighted sum.
        weight = torch.remainder(position * 0.6180339887498949, 1.0) - 0.5
        total += float(chunk.sum())
        absolute += float(chunk.abs().sum())
        weighted += float((chunk * weight).sum())
    return [total, absolute, weighted]


def fingerprint_error(found: list[float], expected: list[float]) -> float:
    scale = max(abs(expected[1]), 1e-30)
    return max(abs(a - b) for a, b in zip(found, expected)) / scale


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """max |found - expected| / max |expected|; exact equality for integer tensors (0 or inf)."""
    if tuple(found.shape) != tuple(expected.shape):
        return math.inf
    if not expected.is_floating_point():
        return 0.0 if torch.equal(found.to(expected.dtype), expected) else math.inf
    diff = (found.double() - expected.double()).abs().max()
    return float(diff / expected.double().abs().max().clamp_min(1e-30))


class Comparison:
    def __init__(self) -> None:
        self.errors: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    def add(self, name: str, error: float, note: str = "") -> None:
        self.errors[name] = math.inf if math.isnan(error) else float(error)  # NaN outputs fail like any mismatch
        if note:
            self.notes[name] = note

    def compare(self, name: str, found: torch.Tensor, expected: torch.Tensor) -> None:
        note = "" if tuple(found.shape) == tuple(expected.shape) else \
            f"shape {tuple(found.shape)} vs reference {tuple(expected.shape)}"
        self.add(name, relative_error(found.detach().cpu(), expected), note)


def _check_weights(result: Comparison, prefix: str, state: dict[str, torch.Tensor],
                   expected: dict[str, list[float]]) -> None:
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected:
            result.add(f"weight {prefix}{name}", math.inf, "missing after loading" if name not in state else
                       "loaded but not written by the export")
            continue
        result.add(f"weight {prefix}{name}", fingerprint_error(fingerprint(state[name]), expected[name]))


@torch.no_grad()
def verify_text(out_dir: Path, reference: dict, result: Comparison) -> None:
    from transformers import AutoModel, AutoTokenizer

    text_dir = out_dir / "text"
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    model, info = AutoModel.from_pretrained(text_dir, trust_remote_code=True, dtype=torch.float32,
                                            output_loading_info=True)
    model.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            result.add(f"text loading: {kind}", math.inf, str(sorted(info[kind])[:5]))
    _check_weights(result, "text/", model.state_dict(), reference["fingerprints"]["text"])
    for index, case in enumerate(reference["text_cases"]):
        label = f"text[{index}]" + (" with instruction" if case["instructions"] else "")
        rows = model.tokenize(case["captions"], tokenizer, case["instructions"] or None)
        for key in ("input_ids", "attention_mask", "pool_mask"):
            result.compare(f"{label} {key}", rows[key], case[key])
        # The reference's own rows go in, so an embedding error is the model's, not the tokenisation's.
        batch = {key: case[key] for key in ("input_ids", "attention_mask", "pool_mask")}
        result.compare(f"{label} llm_embeddings", model(**batch).pooler_output, case["llm_embeddings"])
        if "text_features" in case:
            result.compare(f"{label} text_features", model.get_text_features(**batch), case["text_features"])
    for name in ("logit_scale", "logit_bias"):
        if reference.get(name) is not None:
            found = getattr(model, name, None)
            if found is None:
                result.add(name, math.inf, "absent from the exported model")
            else:
                result.compare(name, found.float(), reference[name].float())


@torch.no_grad()
def verify_vision(out_dir: Path, reference: dict, result: Comparison) -> None:
    import timm
    from PIL import Image
    from transformers import CLIPImageProcessor

    vision = reference["vision"]
    model = timm.create_model(f"local-dir:{out_dir / 'vision'}", pretrained=True).float().eval()
    _check_weights(result, "vision/", model.state_dict(), reference["fingerprints"]["vision"])
    processor = CLIPImageProcessor.from_pretrained(out_dir)
    images = [Image.fromarray(image.numpy()) for image in vision["images"]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    result.compare("vision pixel_values (preprocessor_config.json)", pixels, vision["pixel_values"])
    embeddings = model(pixels)
    result.compare("vision image_embeddings", embeddings, vision["image_embeddings"])
    result.compare("vision image_features", torch.nn.functional.normalize(embeddings, dim=-1),
                   vision["image_features"])
    config = timm.data.resolve_data_config({}, model=model)
    for key in ("mean", "std"):
        result.compare(f"vision timm data config {key}", torch.tensor(config[key], dtype=torch.float64),
                       vision[f"image_{key}"])
    if reference["fingerprints"].get("vision_hf"):
        verify_vision_hf(out_dir, vision, pixels, reference["fingerprints"]["vision_hf"], result)


@torch.no_grad()
def verify_vision_hf(out_dir: Path, vision: dict, pixels: torch.Tensor, expected: dict, result: Comparison) -> None:
    """The transformers copy of the trunk (CLIPVisionModel / SiglipVisionModel) plus the head Linear."""
    import transformers
    from transformers.modeling_utils import load_state_dict

    folder = out_dir / "vision_hf"
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32,
                                                                      output_loading_info=True)
    model.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        for key in info.get(kind) or []:
            result.add(f"weight vision_hf/{key}", math.inf, kind.replace("_", " "))
    head = load_state_dict(str(folder / "head.safetensors"))
    state = {**model.state_dict(), **{f"head.safetensors:{k}": v for k, v in head.items()}}
    _check_weights(result, "vision_hf/", state, expected)
    pooled = model(pixel_values=pixels).pooler_output
    embeddings = torch.nn.functional.linear(pooled, head["weight"].float(), head["bias"].float())
    result.compare("vision_hf image_embeddings", embeddings, vision["image_embeddings"])
    result.compare("vision_hf image_features", torch.nn.functional.normalize(embeddings, dim=-1),
                   vision["image_features"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the export folder (with text/, vision/ ...)")
    parser.add_argument("reference", type=Path, help="reference.pt written by the converter")
    parser.add_argument("--tolerance", type=float, default=None, help="relative tolerance (default: the reference's)")
    args = parser.parse_args(argv)
    reference = torch.load(args.reference, map_location="cpu", weights_only=False)
    tolerance = args.tolerance if args.tolerance is not None else float(reference["tolerance"])
    result = Comparison()
    verify_text(args.out_dir, reference, result)
    if reference.get("vision") is not None:
        verify_vision(args.out_dir, reference, result)

    def limit(name: str) -> float:
        return WEIGHT_TOLERANCE if name.startswith("weight ") else tolerance

    failed = {name: error for name, error in result.errors.items() if not error <= limit(name)}
    outputs = {name: error for name, error in result.errors.items() if not name.startswith("weight ")}
    ranked = sorted(failed or outputs, key=lambda name: (failed or outputs)[name] / limit(name), reverse=True)
    worst = ranked[0] if ranked else None
    report = {"passed": not failed, "tolerance": tolerance, "weight_tolerance": WEIGHT_TOLERANCE,
              "max_rel_error": max(outputs.values(), default=0.0),
              "max_weight_error": max((e for n, e in result.errors.items() if n.startswith("weight ")), default=0.0),
              "worst": worst, "compared": len(result.errors), "failed": sorted(failed, key=failed.get, reverse=True),
              "errors": result.errors, "notes": result.notes}
    leaked = sorted(name for name in sys.modules if name == "llm2clip_scale" or name.startswith("llm2clip_scale."))
    report["standalone"] = not leaked
    print(json.dumps(report, default=str))
    if leaked:
        print(f"verify_export: llm2clip_scale was imported ({leaked[:3]}); the check is not standalone",
              file=sys.stderr)
        return 3
    if failed:
        note = f" ({result.notes[worst]})" if worst in result.notes else ""
        others = [name for name in report["failed"] if name != worst][:5]
        print(f"verify_export: FAILED: {worst}: relative error {failed[worst]:.3g} > tolerance {limit(worst):g}{note}"
              + (f"; also beyond tolerance: {', '.join(others)}" if others else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run by path, Python puts this file's directory first on sys.path; drop it so that no sibling module of the
    # package can shadow a library module.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.exit(main())
