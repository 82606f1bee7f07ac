"""Train a small "pretrained CLIP" on the synthetic set: the stand-in for OpenAI/EVA CLIP that ProCLIP starts from.

    python data_prep/train_reference_clip.py --data data/synthetic --out data/reference_clip [--steps N]

ProCLIP needs a pretrained CLIP (stage 1 distils its text encoder into the LLM adapter; stage 2 starts from its
image encoder), and none can be downloaded here. This trains one from scratch in a single CPU process with
symmetric InfoNCE:

- image side: our VisionTower (the timm trunk and size of ``--config``'s ``model.vision``, tiny_cpu.yaml's by
  default) so the trunk loads into stage 2 unchanged through ``model.vision.pretrained_path``;
- text side: a HuggingFace ``CLIPTextModelWithProjection`` sized to the synthetic word-level tokenizer, so the
  teacher is a real HF CLIP text model and any CLIP export could stand in for it.

Writes to ``--out``:
  vision.safetensors  timm-format trunk state dict, plus ``head.weight``/``head.bias`` = the CLIP image projection
                      (the trunk loader drops ``head.*`` as an "original head"; ``model.vision_head_init`` reads it)
  text/               save_pretrained of the text model and its tokenizer (``proclip.teacher_text``)
  metrics.json        held-out R@1/R@5 both ways, the learned logit scale, steps, wall time
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from llm2clip_scale.config.load import load_config
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.loader import build_eval_loader, build_train_loader, load_tokenizer
from llm2clip_scale.eval.retrieval import retrieval_recall
from llm2clip_scale.models.clip_text import reference_text_config
from llm2clip_scale.models.vision.timm_tower import VisionTower, build_vision_tower
from llm2clip_scale.train.schedule import warmup_cosine

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("train_reference_clip")


@dataclass
class ReferenceParams:
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    eval_samples: int = 500
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    num_workers: int = 1


class ReferenceCLIP(nn.Module):
    """VisionTower + HF CLIP text model + CLIP's learnable temperature (init ln(1/0.07), clamped at ln 100)."""

    def __init__(self, vision: VisionTower, text: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = F.normalize(self.vision(images), dim=-1)
        text = F.normalize(self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds, dim=-1)
        return image, text, self.logit_scale.clamp(max=math.log(100.0)).exp()


def _data_config(cfg: Config, data_dir: Path) -> Config:
    """``cfg`` with its data paths pointed at ``data_dir`` (a make_synthetic.py output)."""
    train = sorted(data_dir.glob("train-*.tar"))
    evals = sorted(data_dir.glob("eval-*.tar"))
    if not train or not (data_dir / "tokenizer").is_dir():
        raise FileNotFoundError(f"{data_dir}: no train-*.tar shards or tokenizer/ (python data_prep/make_synthetic.py)")
    cfg.data.train_shards = "::".join(map(str, train))
    cfg.data.eval_shards = "::".join(map(str, evals)) if evals else None
    cfg.model.llm.tokenizer = str(data_dir / "tokenizer")
    return cfg


def build_reference_clip(cfg: Config, params: ReferenceParams) -> tuple[ReferenceCLIP, object]:
    from transformers import CLIPTextModelWithProjection

    tokenizer = load_tokenizer(cfg.model.llm.tokenizer)
    # The projection size is stage 2's embed_dim, so the image projection (head) drops into the stage-2 tower.
    text_config = reference_text_config(
        tokenizer, cfg.model.embed_dim, width=params.text_width, layers=params.text_layers, heads=params.text_heads,
        max_positions=max(128, cfg.data.max_text_len),
    )
    vision = build_vision_tower(cfg.model.vision, cfg.model.embed_dim)
    return ReferenceCLIP(vision, CLIPTextModelWithProjection(text_config)), tokenizer


@torch.no_grad()
def evaluate_reference(model: ReferenceCLIP, cfg: Config, max_samples: int) -> dict:
    model.eval()
    loader = build_eval_loader(cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, 100, 0, 1,
                               max_samples, cfg.data.max_text_len, cfg.data.eval_caption_field)
    images, texts = [], []
    for batch in loader:
        image, text, _ = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        images.append(image)
        texts.append(text)
    model.train()
    return retrieval_recall(torch.cat(images), torch.cat(texts))


def save_reference_clip(model: ReferenceCLIP, tokenizer: object, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # timm layout: trunk keys as timm names them, the projection as a timm classifier would be (head.weight/bias).
    state = {k: v.detach().contiguous() for k, v in model.vision.trunk.state_dict().items()}
    state["head.weight"] = model.vision.head.weight.detach().contiguous()
    state["head.bias"] = model.vision.head.bias.detach().contiguous()
    save_file(state, str(out / "vision.safetensors"), metadata={"format": "timm"})
    model.text.save_pretrained(str(out / "text"))
    tokenizer.save_pretrained(str(out / "text"))  # type: ignore[attr-defined]


def train_reference_clip(data_dir: str | Path, out: str | Path, params: ReferenceParams | None = None,
                         config: str | Path = REPO / "configs" / "tiny_cpu.yaml",
                         overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Train, evaluate and save the reference CLIP; returns (and writes to out/metrics.json) the metrics.

    ``config`` + ``overrides`` (dotted, as on the CLI) give the vision tower, embed_dim, caption fields, eval field and
    max_text_len; use the same values as the stage-2 config that will load the result.
    """
    params = params or ReferenceParams()
    started = time.perf_counter()
    cfg = _data_config(load_config(config, overrides), Path(data_dir))
    cfg.data.num_workers = params.num_workers
    torch.manual_seed(params.seed)
    model, tokenizer = build_reference_clip(cfg, params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, params.steps, min(params.warmup, params.steps - 1))
    )
    loader = iter(build_train_loader(cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, params.batch,
                                     0, 1, params.seed, cfg.data.max_text_len))
    losses: list[float] = []
    for step in range(1, params.steps + 1):
        batch = next(loader)
        image, text, scale = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        logits = scale * image @ text.T
        target = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step == 1 or step % 50 == 0 or step == params.steps:
            log.info("step %d loss %.4f scale %.2f", step, losses[-1], scale.item())
    train_seconds = time.perf_counter() - started
    metrics: dict = {"steps": params.steps, "batch": params.batch, "first_loss": losses[0], "final_loss": losses[-1]}
    if cfg.data.eval_shards:
        metrics.update(evaluate_reference(model, cfg, params.eval_samples))
        metrics["eval_caption_field"] = cfg.data.eval_caption_field
    metrics["logit_scale"] = model.logit_scale.item()
    metrics["embed_dim"] = cfg.model.embed_dim
    metrics["vision"] = {"name": cfg.model.vision.name, "image_size": cfg.model.vision.image_size,
                         "timm_kwargs": dict(cfg.model.vision.timm_kwargs)}
    save_reference_clip(model, tokenizer, Path(out))
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ReferenceParams()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="synthetic data directory (make_synthetic.py --out)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"),
                        help="config whose model.vision / embed_dim / caption fields the reference CLIP uses")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples)
    parser.add_argument("--num-workers", type=int, default=d.num_workers)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.embed_dim=128")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    params = ReferenceParams(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                             eval_samples=args.eval_samples, num_workers=args.num_workers)
    metrics = train_reference_clip(args.data, args.out, params, args.config, args.overrides)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
