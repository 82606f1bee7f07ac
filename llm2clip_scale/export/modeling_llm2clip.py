"""LLM2CLIP text encoder for transformers, written beside the weights by llm2clip_scale's ``tools/convert_to_hf.py``.

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm_embeddings = model.encode(["a photo of a cat"], tokenizer)        # pooled LLM states (b, hidden)
    text_features = model.encode_text(["a photo of a cat"], tokenizer)    # L2-normalised CLIP features (adapter)

The model is the exported decoder itself (transformers' LlamaModel / Qwen2Model / MistralModel, same weight names)
run the way it was trained as an encoder: bidirectional attention (a 4-D key-padding mask, so no causal triangle),
mean pooling of the final-norm states over a pooling mask (instruction and chat-format tokens are attended to but
not averaged) and, when the checkpoint had them, the LLM2CLIP adapter into the CLIP space (L2-normalise, pre-LN
residual MLP blocks with exact GELU, LayerNorm, Linear) and the learned logit scale / bias. Settings live in the
``llm2clip`` section of config.json.

This file imports only torch and transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config, Qwen2Model
from transformers.modeling_outputs import BaseModelOutputWithPooling

MAX_TEXT_LEN = 512
LLAMA3_USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_END_OF_TURN = "<|eot_id|>"


# ------------------------------------------------------------------------------------------------- caption format


def tokenize_captions(
    tokenizer,
    captions: Sequence[str],
    caption_format: str = "plain",
    instructions: str | Sequence[str] | None = None,
    max_length: int = MAX_TEXT_LEN,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``pool_mask`` (b, L) in the training's caption format.

    plain: ``instruction + caption`` with the tokenizer's own special tokens; everything but the instruction's tokens
    is pooled. llm2vec (LLM2CLIP's released Llama-3 embedder): ``<BOS><|start_header_id|>user<|end_header_id|>\\n\\n``
    + ``instruction `` + caption + ``<|eot_id|>``; only the last n tokens are pooled, n = the token count of
    ``caption.rstrip() + <|eot_id|>`` alone, and a row that is too long loses caption tokens, never ``<|eot_id|>``.
    """
    captions = list(captions)
    if instructions is None:
        instructions = ""
    rows_instructions = [instructions] * len(captions) if isinstance(instructions, str) else list(instructions)
    if len(rows_instructions) != len(captions) or not captions:
        raise ValueError(f"{len(rows_instructions)} instructions for {len(captions)} captions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    max_length = min(int(max_length), MAX_TEXT_LEN)
    if caption_format == "plain":
        rows, pools = _plain_rows(tokenizer, rows_instructions, captions, max_length)
    elif caption_format == "llm2vec":
        rows, pools = _llm2vec_rows(tokenizer, rows_instructions, captions, max_length)
    else:
        raise ValueError(f"caption format {caption_format!r} unknown; use plain or llm2vec")
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    pool_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, (ids, pool) in enumerate(zip(rows, pools)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        pool_mask[row, : len(ids)] = torch.tensor(pool, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}


def _plain_rows(tokenizer, instructions: list[str], captions: list[str], max_length: int):
    # The joined string is tokenised, so the boundary tokenises as in training; a token is an instruction token when
    # it is no special token and ends inside the instruction's characters (needs a fast tokenizer's offsets).
    encoded = tokenizer([i + c for i, c in zip(instructions, captions)], truncation=True, max_length=max_length,
                        return_offsets_mapping=True, return_special_tokens_mask=True)
    rows, pools = [], []
    for row, instruction in enumerate(instructions):
        limit = len(instruction)
        special = encoded["special_tokens_mask"][row]
        ends = [end for _, end in encoded["offset_mapping"][row]]
        pool = [0 if (limit > 0 and not s and e <= limit) else 1 for s, e in zip(special, ends)]
        if captions[row].strip() and not any(p and not s for p, s in zip(pool, special)):
            raise ValueError(f"row {row}: the instruction fills max_length={max_length}; no caption token is left")
        rows.append(list(encoded["input_ids"][row]))
        pools.append(pool)
    return rows, pools


def _llm2vec_rows(tokenizer, instructions: list[str], captions: list[str], max_length: int):
    for token in ("<|start_header_id|>", "<|end_header_id|>", LLAMA3_END_OF_TURN):
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"caption format llm2vec needs the Llama-3 chat token {token} as one token")
    end_ids = tokenizer(LLAMA3_END_OF_TURN, add_special_tokens=False)["input_ids"]
    rows, pools = [], []
    for row, (instruction, caption) in enumerate(zip(instructions, captions)):
        pooled_text = caption.rstrip() + LLAMA3_END_OF_TURN
        prompt = f"{instruction.strip()} " if instruction.strip() else ""
        ids = tokenizer(LLAMA3_USER_HEADER + prompt + pooled_text)["input_ids"]
        start = len(ids) - len(tokenizer(pooled_text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_length:
            ids = ids[: max_length - len(end_ids)] + end_ids
        if start >= len(ids) - len(end_ids) and caption.strip():
            raise ValueError(f"row {row}: the chat header and instruction fill max_length={max_length}")
        rows.append(ids)
        pools.append([0] * start + [1] * (len(ids) - start))
    return rows, pools


# ------------------------------------------------------------------------------------------------------- adapter


class ResidualMLPBlock(nn.Module):
    """Pre-LN residual MLP: x + fc2(gelu(fc1(ln(x)))), exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LLM2CLIPAdapter(nn.Module):
    """L2-normalise, N residual MLP blocks (d -> expansion*d -> d), LayerNorm, Linear -> embed_dim."""

    def __init__(self, input_dim: int, num_blocks: int, expansion: int, embed_dim: int,
                 layernorm_eps: float = 1e-5) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(ResidualMLPBlock(input_dim, expansion * input_dim, layernorm_eps) for _ in range(num_blocks)))
        self.norm = nn.LayerNorm(input_dim, eps=layernorm_eps)
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.blocks(F.normalize(llm_embeddings, dim=-1))))


# ------------------------------------------------------------------------------------------------------- encoder


class LLM2CLIPEncoderMixin:
    """Encoder behaviour over a transformers decoder base model (the class it is mixed into)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.llm2clip_settings = dict(getattr(config, "llm2clip", None) or {})
        adapter = self.llm2clip_settings.get("adapter")
        self.adapter = LLM2CLIPAdapter(**adapter) if adapter else None
        # Shape [1] as in training; the values come from the weights.
        self.logit_scale = nn.Parameter(torch.zeros(1)) if self.llm2clip_settings.get("logit_scale") is not None \
            else None
        self.logit_bias = nn.Parameter(torch.zeros(1)) if self.llm2clip_settings.get("logit_bias") is not None \
            else None
        if self.bidirectional:
            for layer in self.layers:  # no kernel may fall back to a causal triangle
                layer.self_attn.is_causal = False
        self.post_init()

    @property
    def bidirectional(self) -> bool:
        return bool(self.llm2clip_settings.get("bidirectional", True))

    def _attention_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Key-padding mask for every query (bidirectional); pad queries keep their row, so no softmax is empty."""
        if not self.bidirectional or "flash" in str(self.config._attn_implementation):
            return attention_mask  # flash kernels take the 2-D mask and is_causal=False from the modules
        keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
        if self.config._attn_implementation == "eager":  # eager adds the mask to the scores
            return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        return keep  # sdpa: boolean, True = may attend; transformers passes a ready 4-D mask through as is

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pool_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        """Token states and their mean over ``pool_mask`` (default: the attention mask) as ``pooler_output``."""
        batch_shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.embed_tokens.weight.device
        if attention_mask is None:
            attention_mask = torch.ones(batch_shape, dtype=torch.long, device=device)
        kwargs["use_cache"] = False
        outputs = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                  attention_mask=self._attention_mask(attention_mask, self.embed_tokens.weight.dtype),
                                  **kwargs)
        hidden = outputs.last_hidden_state
        weights = (attention_mask if pool_mask is None else pool_mask).to(device=hidden.device,
                                                                          dtype=torch.float32)[..., None]
        pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled,
                                          hidden_states=getattr(outputs, "hidden_states", None),
                                          attentions=getattr(outputs, "attentions", None))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised CLIP-space text features (needs the adapter: stage-2 and ProCLIP exports)."""
        if self.adapter is None:
            raise ValueError("this export has no adapter (an LLM2CLIP stage-1 LLM); use encode() / pooler_output")
        pooled = self(input_ids=input_ids, attention_mask=attention_mask, pool_mask=pool_mask).pooler_output
        return F.normalize(self.adapter(pooled.to(self.adapter.proj.weight.dtype)).float(), dim=-1)

    def tokenize(self, captions: Sequence[str], tokenizer, instructions: str | Sequence[str] | None = None,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Token rows in the caption format this model was trained with (config ``llm2clip.caption_format``)."""
        return tokenize_captions(tokenizer, captions, self.llm2clip_settings.get("caption_format", "plain"),
                                 instructions, max_length or self.llm2clip_settings.get("max_length", MAX_TEXT_LEN))

    @torch.no_grad()
    def encode(self, captions: Sequence[str], tokenizer, instructions: str | Sequence[str] | None = None,
               max_length: int | None = None) -> torch.Tensor:
        """Pooled LLM embeddings (b, hidden) in float32 of ``captions``."""
        batch = {k: v.to(self.embed_tokens.weight.device)
                 for k, v in self.tokenize(captions, tokenizer, instructions, max_length).items()}
        return self(**batch).pooler_output

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], tokenizer, instructions: str | Sequence[str] | None = None,
                    max_length: int | None = None) -> torch.Tensor:
        """L2-normalised CLIP-space features (b, embed_dim) of ``captions``."""
        batch = {k: v.to(self.embed_tokens.weight.device)
                 for k, v in self.tokenize(captions, tokenizer, instructions, max_length).items()}
        return self.get_text_features(**batch)

    def scale(self) -> torch.Tensor:
        """exp of the learned temperature, clamped at ``logit_scale_max`` as in training (CLIP's ln 100)."""
        if self.logit_scale is None:
            raise ValueError("this export has no logit scale (it was not trained in this stage)")
        cap = float(self.llm2clip_settings.get("logit_scale_max", 4.605170185988092))
        return self.logit_scale.float().clamp(max=cap).exp().squeeze(0)


class LLM2CLIPLlamaEncoder(LLM2CLIPEncoderMixin, LlamaModel):
    config_class = LlamaConfig


class LLM2CLIPQwen2Encoder(LLM2CLIPEncoderMixin, Qwen2Model):
    config_class = Qwen2Config


class LLM2CLIPMistralEncoder(LLM2CLIPEncoderMixin, MistralModel):
    config_class = MistralConfig
