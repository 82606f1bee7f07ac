"""Stage-2 towers as the eval tasks see them: images -> image features, captions -> LLM embeddings -> text features.

Every call is collective in the way the towers are (the TP group embeds its ranks' captions together; ZeRO-3 gathers
parameters), so every rank must make the same calls with the same row counts: :mod:`llm2clip_scale.eval.tasks`
pads each rank's share to one length for that reason.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from llm2clip_scale.data.prompts import tokenize_captions
from llm2clip_scale.data.samples import load_tokenizer
from llm2clip_scale.models.llm.embed import embed_local_batch


class Encoders(Protocol):
    """What the eval tasks need of a model: unit image features, LLM embeddings and unit text features."""

    def images(self, images: torch.Tensor) -> torch.Tensor: ...

    def llm(self, captions: list[str]) -> torch.Tensor: ...

    def texts(self, captions: list[str]) -> torch.Tensor: ...


class Stage2Encoders:
    """``model`` is the CLIPWithAdapter (the DeepSpeed engine's module); ``text_tower`` the frozen LLM or None
    (offline training without an online eval split: then only image features are available)."""

    def __init__(self, model: nn.Module, text_tower: nn.Module | None, tp_group, tokenizer_path: str | None,
                 caption_format: str, max_text_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.text_tower, self.tp_group = model, text_tower, tp_group
        self.tokenizer_path, self.caption_format, self.max_text_len = tokenizer_path, caption_format, max_text_len
        self.dtype, self.device = dtype, device
        self._tokenizer = None

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) normalised pixels -> (b, embed_dim) unit image features, fp32."""
        return self.model.encode_image(images.to(self.device, self.dtype)).float()

    def llm(self, captions: list[str]) -> torch.Tensor:
        """Captions as the stage-2 text path embeds them (model.llm.caption_format, no instruction) -> (b, hidden)."""
        if self.text_tower is None or not self.tokenizer_path:
            raise ValueError("this eval task embeds captions with the LLM, which this run does not build (offline "
                             "training); give data.eval_shards without data.eval_embedding_shards, or model.llm."
                             "tokenizer, so that the LLM is built online")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        ids, mask, pool = tokenize_captions(self._tokenizer, captions, self.caption_format, max_len=self.max_text_len)
        return embed_local_batch(self.text_tower, ids.to(self.device), mask.to(self.device), self.tp_group,
                                 pool_mask=pool.to(self.device))

    def texts(self, captions: list[str]) -> torch.Tensor:
        """Captions -> LLM -> adapter -> (b, embed_dim) unit text features, fp32."""
        return self.model.encode_text(self.llm(captions).to(self.dtype)).float()
