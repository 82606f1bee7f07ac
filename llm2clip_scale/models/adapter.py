"""LLM2CLIP adapter: maps frozen LLM caption embeddings into the CLIP embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip_scale.config.schema import AdapterConfig
from llm2clip_scale.kernels import build_layernorm


class ResidualMLPBlock(nn.Module):
    """Pre-LN residual MLP: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = build_layernorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LLMAdapter(nn.Module):
    """L2-normalise, N residual MLP blocks (d -> expansion*d -> d), LayerNorm, Linear -> embed_dim."""

    def __init__(self, cfg: AdapterConfig, embed_dim: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ResidualMLPBlock(cfg.input_dim, cfg.expansion * cfg.input_dim) for _ in range(cfg.num_blocks))
        )
        self.norm = build_layernorm(cfg.input_dim)
        self.proj = nn.Linear(cfg.input_dim, embed_dim)

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.blocks(F.normalize(llm_embeddings, dim=-1))))
