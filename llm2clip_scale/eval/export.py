"""The eval tasks on an exported model (``tools/convert_to_hf.py`` output), loaded with stock transformers and timm
as a user would: ``llm2clip-scale eval CONFIG --export DIR`` (one process; CONFIG names the eval data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llm2clip_scale.config.schema import Config
from llm2clip_scale.eval.task_config import write_eval_result
from llm2clip_scale.eval.tasks import run_tasks


class ExportEncoders:
    """Images through the timm folder, captions through the transformers encoder (``modeling_llm2clip.py``)."""

    def __init__(self, export_dir: str | Path, device: torch.device | str = "cpu") -> None:
        import timm
        from transformers import AutoModel, AutoTokenizer

        root = Path(export_dir)
        if not (root / "text" / "config.json").is_file() or not (root / "vision").is_dir():
            raise ValueError(f"--export: {root} is not an export folder (text/ and vision/ of tools/convert_to_hf.py)")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "text")
        self.text = AutoModel.from_pretrained(root / "text", trust_remote_code=True, dtype=torch.float32)
        self.text.to(self.device).eval()
        if not hasattr(self.text, "get_text_features") or getattr(self.text, "adapter", None) is None:
            raise ValueError(f"--export: {root} has no adapter (a stage-1 export); the eval tasks need a stage-2 one")
        self.vision = timm.create_model(f"local-dir:{root / 'vision'}", pretrained=True).float().to(self.device).eval()

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(images.to(self.device)).float(), dim=-1)

    def llm(self, captions: list[str]) -> torch.Tensor:
        return self.text.encode(captions, self.tokenizer).float()

    def texts(self, captions: list[str]) -> torch.Tensor:
        return self.text.encode_text(captions, self.tokenizer).float()


def export_image_settings(cfg: Config, export_dir: str | Path) -> Config:
    """``cfg`` with the image size, mean and std of the export's preprocessor_config.json (the export's own eval
    transform: bicubic resize of the short side, centre crop, normalise)."""
    try:
        pre = json.loads((Path(export_dir) / "preprocessor_config.json").read_text())
        size, mean, std = int(pre["crop_size"]["height"]), list(pre["image_mean"]), list(pre["image_std"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--export: {export_dir}/preprocessor_config.json unreadable ({err})") from None
    vision = dataclasses.replace(cfg.model.vision, image_size=size)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision=vision),
                               data=dataclasses.replace(cfg.data, image_mean=mean, image_std=std))


@torch.no_grad()
def evaluate_export(cfg: Config, export_dir: str | Path) -> dict:
    """Metrics of eval.tasks (long_retrieval included, through the same reader as the others) on the export; rank 0
    of one process, written to ``<logging.dir>/eval.json`` too."""
    cfg = export_image_settings(cfg, export_dir)
    metrics = run_tasks(list(cfg.eval.tasks), cfg, ExportEncoders(export_dir))
    if not metrics:
        raise ValueError("eval.tasks: none of the tasks has data; set data.eval_shards or eval.<task>_data")
    result = {"export": str(export_dir), "tasks": list(cfg.eval.tasks), **metrics}
    write_eval_result(cfg, result)
    return result
