"""Evaluate a CLIP-style model from ``data_prep/train_reference_clip.py`` with the stage-2 eval tasks.

    python tools/eval_reference_clip.py CONFIG --model DIR [--tasks long_retrieval,retrieval,zeroshot] [--out JSON]
        [overrides]

The baseline of docs/RESULTS.md comparison 3: the LLM tower against a CLIP text transformer trained the same number
of steps. Both sides are scored by the same code: the eval sets are read by ``data/eval_sets.read_eval_set`` through
``eval/tasks.run_tasks`` and scored by its metric functions (``retrieval_recall``, ``multi_caption_recall``,
``zeroshot_accuracy``); only the encoders differ. CONFIG supplies the eval data, ``eval:`` settings, image size and
normalisation, and ``data.max_text_len`` (the reference CLIP was trained with the same values, so captions tokenise
as in its training). ``cra`` is not offered: it measures the LLM's embeddings, which this model has none of.

Prints one JSON line; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llm2clip_scale.config.load import load_config
from llm2clip_scale.eval.tasks import run_tasks
from llm2clip_scale.models.clip_text import CLIPTextTeacher, load_clip_text_teacher
from llm2clip_scale.models.vision.timm_tower import VisionTower, build_vision_tower
from llm2clip_scale.models.warm_start import load_vision_head

TASKS = ("long_retrieval", "retrieval", "zeroshot")


class ReferenceCLIPEncoders:
    """The :class:`llm2clip_scale.eval.encoders.Encoders` of a reference CLIP: its image tower and text model."""

    def __init__(self, vision: VisionTower, text: CLIPTextTeacher, max_text_len: int) -> None:
        self.vision, self.text, self.max_text_len = vision.eval(), text, max_text_len

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(images).float(), dim=-1)

    def llm(self, captions: list[str]) -> torch.Tensor:
        raise ValueError("a reference CLIP has no LLM embeddings: the cra task does not apply to it")

    def texts(self, captions: list[str]) -> torch.Tensor:
        return self.text.encode(captions, max_length=self.max_text_len)


def load_reference_encoders(model_dir: str | Path, config: str | Path, overrides: list[str] | tuple[str, ...] = ()
                            ) -> tuple[ReferenceCLIPEncoders, object]:
    """(encoders, config) for the ``train_reference_clip.py`` output ``model_dir`` evaluated on ``config``'s data."""
    model_dir = Path(model_dir)
    vision_file = model_dir / "vision.safetensors"
    if not vision_file.is_file() or not (model_dir / "text" / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no vision.safetensors or text/ (train_reference_clip.py --out)")
    cfg = load_config(config, overrides)
    cfg.model.vision.pretrained_path = str(vision_file)
    # embed_dim from the file: the head is the CLIP image projection, so a mismatching config fails in load_vision_head.
    text = load_clip_text_teacher(model_dir / "text")
    vision = build_vision_tower(cfg.model.vision, text.embed_dim)
    load_vision_head(vision.head, vision_file)
    return ReferenceCLIPEncoders(vision, text, cfg.data.max_text_len), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config with the eval data (the stage-2 config of the comparison)")
    parser.add_argument("--model", required=True, help="train_reference_clip.py --out directory")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        parser.error(f"--tasks: {', '.join(unknown) or 'none given'}; choose from {', '.join(TASKS)}")
    torch.manual_seed(0)
    encoders, cfg = load_reference_encoders(args.model, args.config, args.overrides)
    metrics = {"model": str(args.model), **run_tasks(tasks, cfg, encoders)}
    line = json.dumps(metrics)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
