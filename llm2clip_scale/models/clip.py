"""The trainable half of stage 2: vision tower, adapter and logit scale. Knows nothing of data or the LLM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip_scale.config.schema import ModelConfig
from llm2clip_scale.models.adapter import LLMAdapter
from llm2clip_scale.models.vision.timm_tower import build_vision_tower, cast_parameters


class CLIPWithAdapter(nn.Module):
    def __init__(
        self,
        vision: nn.Module,
        adapter: nn.Module,
        logit_scale_init: float,
        logit_scale_max: float,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        # Shape [1], not []: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes (CPU_STACK.md D3).
        self.logit_scale = nn.Parameter(torch.full([1], logit_scale_init))
        self.logit_scale_max = logit_scale_max
        # SigLIP's sigmoid loss needs a learnable bias; InfoNCE is shift-invariant and has none.
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.full([1], logit_bias_init))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(images), dim=-1)

    def encode_text(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.adapter(llm_embeddings), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp of the learnable temperature, clamped at logit_scale_max (ln 100) as in CLIP."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp().squeeze(0)

    def forward(
        self, images: torch.Tensor, llm_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (image features, text features, logit scale, logit bias or None); features are L2-normalised."""
        bias = None if self.logit_bias is None else self.logit_bias.squeeze(0)
        return self.encode_image(images), self.encode_text(llm_embeddings), self.scale(), bias


def build_clip_model(cfg: ModelConfig, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> CLIPWithAdapter:
    """The trainable model on ``device`` in ``dtype`` (default: CPU, fp32). The vision tower is built there directly
    (build_vision_tower); the small parts are drawn on the CPU in fp32 and moved, so their init is device-free."""
    model = CLIPWithAdapter(
        vision=build_vision_tower(cfg.vision, cfg.embed_dim, device=device, dtype=dtype),
        adapter=LLMAdapter(cfg.adapter, cfg.embed_dim),
        logit_scale_init=cfg.logit_scale_init,
        logit_scale_max=cfg.logit_scale_max,
        logit_bias_init=cfg.logit_bias_init,
    )
    # ProCLIP stage 2 warm starts (see llm2clip_scale.models.warm_start); both default to None (LLM2CLIP).
    if cfg.adapter_init or cfg.vision_head_init:
        from llm2clip_scale.models.warm_start import load_adapter, load_vision_head

        if cfg.adapter_init:
            load_adapter(model.adapter, cfg.adapter_init)
        if cfg.vision_head_init:
            load_vision_head(model.vision.head, cfg.vision_head_init)
    return cast_parameters(model.to(device), dtype)
