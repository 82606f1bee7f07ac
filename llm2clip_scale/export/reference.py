"""What the export must reproduce: the training-time model's outputs on fixed captions and images.

The model is rebuilt the way training builds it, in fp32 and at TP=1 / PP=1 in this one process (a world-1 gloo
group and megatron's groups are created if the caller has none): the megatron text tower from ``model.llm``, with
the stage-1 LoRA of ``model.llm.lora_init`` merged as ``build_text_tower`` does and a LoRA the checkpoint trained
(stage 1; stage 2 with ``lora_rank > 0``) applied *unmerged* (``build_lora_tower``: the adapters' forward hooks) —
and ``CLIPWithAdapter`` (or ProCLIP's
adapter) filled from the consolidated DeepSpeed state. Captions are tokenised by ``tokenize_captions`` in the run's
caption format, with and without an instruction; images are deterministic random pixels through the training eval
transform. Everything is returned as CPU tensors; the models are freed before this returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip_scale.config.schema import Config
from llm2clip_scale.export.source import CheckpointSource

SAMPLE_CAPTIONS = (
    "a red circle above a blue square.",
    "two small green triangles on the left of the picture, and one large yellow shape in the center.",
    "a picture of three purple shapes on a white background.",
    "the orange square is below the gray circle ",
    "A photo of a cat sitting on a windowsill in the afternoon sun.",
    "black triangle",
)
SAMPLE_INSTRUCTION = "Given a caption, retrieve a detailed relevant caption: "
NUM_IMAGES = 4
IMAGE_SEED = 20240917


def text_max_length(cfg: Config) -> int:
    """Tokens per caption the run used (data.max_text_len), within the tower's RoPE table and LLM2CLIP's 512."""
    return min(cfg.data.max_text_len, cfg.model.llm.max_seq_len, 512)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_process_topology() -> Iterator[None]:
    """megatron's TP=1 / PP=1 groups over a world-1 gloo group (created here unless the caller has one)."""
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, shutdown

    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # An in-process store: a world of one needs no rendezvous, and no port can be taken by another job.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise RuntimeError("export verification builds the model at TP=1 / PP=1; run it in a process of its own "
                               "(this one holds other model-parallel groups)")
        build_topology(1, 1)
        yield
    finally:
        if created:
            shutdown()


def tokenized_cases(cfg: Config) -> list[dict]:
    """The sample captions in the run's caption format: once without, once with an instruction."""
    from llm2clip_scale.data.prompts import tokenize_captions
    from llm2clip_scale.data.samples import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.llm.tokenizer)
    cases = []
    for instructions in ("", SAMPLE_INSTRUCTION):
        ids, mask, pool = tokenize_captions(tokenizer, list(SAMPLE_CAPTIONS), cfg.model.llm.caption_format,
                                            instructions, text_max_length(cfg))
        cases.append({"captions": list(SAMPLE_CAPTIONS), "instructions": instructions, "input_ids": ids,
                      "attention_mask": mask, "pool_mask": pool})
    return cases


def _reference_tower(source: CheckpointSource) -> nn.Module:
    cfg = source.cfg
    if source.has_trained_lora:  # stage 1, or stage 2 that trained a LoRA over its (merged) lora_init
        from llm2clip_scale.train.llm2clip_cc import build_lora_tower

        tower, _ = build_lora_tower(cfg, torch.float32, None, lora=source.path, trainable=False)
        return tower
    from llm2clip_scale.models.llm.tower import build_text_tower

    return build_text_tower(cfg.model.llm, params_dtype=torch.float32, trainable=False)


@torch.no_grad()
def llm_reference(source: CheckpointSource, cases: list[dict]) -> None:
    """Adds ``llm_embeddings`` (pooled, fp32) to every case, from the megatron tower; frees the tower."""
    with single_process_topology():
        tower = _reference_tower(source)
        device = next(tower.parameters()).device
        for case in cases:
            rows = [case[k].to(device) for k in ("input_ids", "attention_mask", "pool_mask")]
            case["llm_embeddings"] = tower(*rows).float().cpu()
        del tower
    gc.collect()


def _materialise(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A module built on the meta device, filled from ``state`` (strict) without a random init in between."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    module = module.to_empty(device="cpu")
    reinit_non_persistent_buffers(module)
    module.load_state_dict(state, strict=True, assign=True)
    return module.float().eval()


def reference_images(cfg: Config) -> tuple[Tensor, Tensor]:
    """(uint8 images (n, S, S, 3), their pixel values through the training eval transform (n, 3, S, S))."""
    from PIL import Image

    from llm2clip_scale.data.samples import ImageTransform

    size = cfg.model.vision.image_size
    generator = torch.Generator().manual_seed(IMAGE_SEED)
    images = torch.randint(0, 256, (NUM_IMAGES, size, size, 3), generator=generator, dtype=torch.uint8)
    transform = ImageTransform(size, list(cfg.data.image_mean), list(cfg.data.image_std), "none", None)
    pixels = torch.stack([transform(Image.fromarray(image.numpy())) for image in images])
    return images, pixels


@torch.no_grad()
def clip_reference(source: CheckpointSource, engine_state: dict[str, Tensor], cases: list[dict]) -> dict:
    """Adds ``text_features`` to every case and returns the image side and scalars, from the trained DeepSpeed
    module: CLIPWithAdapter (stage 2) or the adapter alone (ProCLIP stage 1)."""
    from llm2clip_scale.models.adapter import LLMAdapter

    cfg = source.cfg
    model_cfg = cfg.model
    out: dict = {}
    if source.has_vision:
        from llm2clip_scale.models.clip import CLIPWithAdapter
        from llm2clip_scale.models.vision.timm_tower import build_vision_tower

        vision_cfg = dataclasses.replace(model_cfg.vision, pretrained_path=None)  # overwritten from the checkpoint
        with torch.device("meta"):
            model = CLIPWithAdapter(build_vision_tower(vision_cfg, model_cfg.embed_dim, device="meta"),
                                    LLMAdapter(model_cfg.adapter, model_cfg.embed_dim),
                                    model_cfg.logit_scale_init, model_cfg.logit_scale_max, model_cfg.logit_bias_init)
        model = _materialise(model, engine_state)
        images, pixels = reference_images(cfg)
        embeddings = model.vision(pixels)
        out["vision"] = {"images": images, "pixel_values": pixels, "image_embeddings": embeddings,
                         "image_features": F.normalize(embeddings, dim=-1)}
        out["logit_scale"] = model.logit_scale.detach().clone()
        out["logit_bias"] = None if model.logit_bias is None else model.logit_bias.detach().clone()
        encode_text = model.encode_text
    else:
        with torch.device("meta"):
            adapter = LLMAdapter(model_cfg.adapter, model_cfg.embed_dim)
        adapter = _materialise(adapter, {k[len("adapter."):]: v for k, v in engine_state.items()})

        def encode_text(llm_embeddings: Tensor) -> Tensor:
            return F.normalize(adapter(llm_embeddings), dim=-1)

    for case in cases:
        case["text_features"] = encode_text(case["llm_embeddings"])
    return out


def save_reference(path: Path, reference: dict) -> None:
    torch.save(reference, path)
