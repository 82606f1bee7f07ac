"""The frozen CLIP text encoder E_T that ProCLIP stage 1 distils into the LLM adapter.

Any HuggingFace ``CLIPTextModelWithProjection`` directory works (OpenAI / open_clip exports, or the small reference
CLIP that ``data_prep/train_reference_clip.py`` trains on the synthetic set); its tokenizer must be saved beside it,
because the teacher reads raw captions, not the LLM's token ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerBase


def reference_text_config(tokenizer: PreTrainedTokenizerBase, embed_dim: int, width: int = 128, layers: int = 3,
                          heads: int = 4, max_positions: int = 128) -> CLIPTextConfig:
    """A small CLIP text config sized to ``tokenizer`` (vocabulary, pad/BOS/EOS ids).

    The EOS id matters: HF CLIP pools the hidden state at the first EOS token (except for the legacy id 2, where it
    takes the argmax token id), so it must be the tokenizer's own EOS or pooling reads a random position.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the CLIP text teacher pools at EOS: its tokenizer needs an eos_token")
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=embed_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class CLIPTextTeacher(nn.Module):
    """A frozen ``CLIPTextModelWithProjection`` returning L2-normalised ``text_embeds``; knows its own tokenizer."""

    def __init__(self, model: CLIPTextModelWithProjection, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.model = model.float().requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = int(model.config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def train(self, mode: bool = True) -> CLIPTextTeacher:
        # Frozen target: stays in eval mode even if a parent module is put in train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, L) teacher token ids -> (b, projection_dim) float32, unit norm."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out.text_embeds.float(), dim=-1)

    @torch.no_grad()
    def encode_ids(self, ids: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
        """Captions already tokenised by :attr:`tokenizer` (each within the position table), right-padded to the
        longest as :meth:`encode` pads them -> embeddings. Saves a second tokenisation of captions whose token
        lengths the caller needed anyway."""
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return self(input_ids.to(device), attention_mask.to(device))

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str = "cpu", max_length: int | None = None
               ) -> torch.Tensor:
        """Tokenise raw captions with the teacher's tokenizer (truncated to its position table) and embed them."""
        limit = min(self.max_length, max_length) if max_length else self.max_length
        encoded = self.tokenizer(captions, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
        return self(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))


def load_clip_text_teacher(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> CLIPTextTeacher:
    """Load the frozen teacher (model + tokenizer) from a ``save_pretrained`` directory; float32, eval, no grads."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"CLIP text teacher: {str(p)!r} has no config.json (expected a save_pretrained dir)")
    model = CLIPTextModelWithProjection.from_pretrained(str(p), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    if tokenizer.pad_token is None:  # padding positions are masked, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return CLIPTextTeacher(model, tokenizer).to(device)
