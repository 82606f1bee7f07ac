"""The export's model card (README.md) and provenance record (export.json)."""

from __future__ import annotations

import json
from pathlib import Path

from llm2clip_scale.checkpoint import layout
from llm2clip_scale.export.source import CheckpointSource

_STAGE_NAMES = {
    "llm2clip_cc": "LLM2CLIP stage 1 (caption-contrastive LoRA fine-tuning of the LLM)",
    "proclip_inherit": "ProCLIP stage 1 (adapter distilled from a CLIP text encoder)",
    "stage2": "LLM2CLIP stage 2 (vision tower + adapter against the frozen LLM)",
}


def file_records(root: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``root`` (export.json's integrity list)."""
    return dict(layout.file_record(path, root) for path in layout.list_files(root))


def _usage(source: CheckpointSource, has_adapter: bool) -> str:
    lines = [
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'export = "OUT_DIR"  # this folder',
        'text_model = AutoModel.from_pretrained(f"{export}/text", trust_remote_code=True).eval()',
        'tokenizer = AutoTokenizer.from_pretrained(f"{export}/text")',
        'captions = ["a red circle above a blue square.", "two green triangles."]',
        "llm_embeddings = text_model.encode(captions, tokenizer)  # mean-pooled LLM states, caption format applied",
    ]
    if has_adapter:
        lines.append("text_features = text_model.encode_text(captions, tokenizer)  # L2-normalised CLIP features")
    if source.has_vision:
        lines = [
            "import timm",
            "from PIL import Image",
            *lines,
            "",
            'vision = timm.create_model(f"local-dir:{export}/vision", pretrained=True).eval()',
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=vision))",
            "with torch.no_grad():",
            '    image = vision(transform(Image.open("image.jpg").convert("RGB"))[None])',
            "    image_features = torch.nn.functional.normalize(image, dim=-1)",
            "    probs = (text_model.scale() * image_features @ text_features.T).softmax(dim=-1)",
        ]
    return "\n".join(lines)


def model_card(source: CheckpointSource, record: dict) -> str:
    """README.md: what this is, where it came from, how to load it, how it was verified."""
    cfg = source.cfg
    llm, vision = cfg.model.llm, cfg.model.vision
    has_adapter = record.get("adapter") is not None
    loras = record["text"].get("lora") or []
    verification = record.get("verification") or {}
    highlights = [
        f"- stage: `{source.stage}` — {_STAGE_NAMES[source.stage]}",
        f"- checkpoint: `{source.path}` (step {source.step}; layout {json.dumps(source.layout)})",
        f"- LLM: {llm.num_layers} layers, hidden {llm.hidden_size}, "
        + (f"from `{llm.hf_checkpoint}`" if llm.hf_checkpoint else f"seeded random weights (seed {llm.seed})")
        + "".join(f"; LoRA merged (rank {lora['rank']}, alpha {lora['alpha']}, `{lora['file']}`)" for lora in loras),
        f"- text: {'bidirectional' if llm.bidirectional else 'causal'} attention, mean pooling, caption format "
        f"`{llm.caption_format}`, up to {record['text']['max_length']} tokens",
    ]
    if has_adapter:
        adapter = cfg.model.adapter
        highlights.append(f"- adapter: {adapter.num_blocks} residual MLP block(s) ({adapter.input_dim} → "
                          f"{adapter.expansion * adapter.input_dim} → {adapter.input_dim}), projection to "
                          f"{cfg.model.embed_dim}")
    if source.has_vision:
        highlights.append(f"- vision: timm `{vision.name}` at {vision.image_size}px "
                          + (f"(LoRA rank {vision.lora_rank} merged)" if vision.lora_rank else ""))
    if record.get("logit_scale") is not None:
        highlights.append(f"- logit scale: {record['logit_scale']['value']:.4f} (ln; × "
                          f"{record['logit_scale']['exp']:.2f})")
    layout_lines = ["- `text/`: transformers model folder (weights, config.json, modeling_llm2clip.py, tokenizer)"]
    if source.has_vision:
        layout_lines += ["- `vision/`: timm model folder (config.json + model.safetensors); the classifier head is "
                         "the CLIP image projection", "- `preprocessor_config.json`: image preprocessing "
                         "(CLIPImageProcessor format)"]
    vision_hf = record.get("vision_hf") or {}
    if "architecture" in vision_hf:
        layout_lines.append(f"- `vision_hf/`: the same tower as a transformers `{vision_hf['architecture']}` (trunk; "
                            "`pooler_output`) plus `head.safetensors`, the image projection: "
                            "`pooler_output @ head['weight'].T + head['bias']` is the image embedding")
    elif vision_hf.get("skipped"):
        layout_lines.append(f"- no transformers copy of the vision tower: {vision_hf['skipped']}")
    if has_adapter:
        layout_lines.append("- `adapter.safetensors`, `clip_config.json`: the adapter and joint-space settings")
    layout_lines.append("- `export.json`: provenance, file checksums and the verification result")
    verified = ("not run (--no-verify)" if not verification else
                f"{'passed' if verification.get('passed') else 'FAILED'}: max relative error "
                f"{verification.get('max_rel_error', float('nan')):.2e} (tolerance {verification.get('tolerance')}) "
                "against the training-time model, reloaded with stock transformers and timm only")
    return "\n".join([
        f"# LLM2CLIP export: {Path(str(cfg.checkpoint.dir)).name or 'checkpoint'} step {source.step}",
        "",
        "Exported by `tools/convert_to_hf.py` of llm2clip-scale.",
        "",
        "## Provenance",
        "",
        *highlights,
        "",
        "## Files",
        "",
        *layout_lines,
        "",
        "## Usage",
        "",
        "```python",
        _usage(source, has_adapter),
        "```",
        "",
        "## Verification",
        "",
        verified,
        "",
    ])
