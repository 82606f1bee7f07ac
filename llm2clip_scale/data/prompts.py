"""LLM2CLIP / LLM2Vec-style instructions and their tokenisation with a pooling mask that leaves them out.

An instruction tells the bidirectional LLM what the embedding is for ("retrieve a detailed caption"); the caption
tokens attend to it, but only the caption's own tokens are averaged into the embedding. Special tokens (BOS/EOS) are
pooled as caption tokens, exactly as the stage-2 pipeline pools an instruction-less caption (attention mask), so an
empty instruction gives ``pool_mask == attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

MAX_TEXT_LEN = 512  # LLM2CLIP's longest captions; the tower's RoPE tables are sized for it

DEFAULT_INSTRUCTION = "Given a caption, retrieve a detailed relevant caption: "
# Retrieval direction between caption kinds; fields of a sample are ranked by how much of the image they describe.
TO_DETAILED = "Given a short caption of an image, retrieve a detailed caption of the same image: "
TO_BRIEF = "Given a detailed caption of an image, retrieve a short caption of the same image: "
SAME_KIND = "Given a caption of an image, retrieve another caption of the same image: "
FIELD_DETAIL: dict[str, int] = {"raw": 0, "short": 1, "long": 2}


def instruction_for(query_field: str | None, key_field: str | None) -> str:
    """The instruction for queries of ``query_field`` that look for captions of ``key_field`` (unknown: default)."""
    if query_field not in FIELD_DETAIL or key_field not in FIELD_DETAIL:
        return DEFAULT_INSTRUCTION
    query_rank, key_rank = FIELD_DETAIL[query_field], FIELD_DETAIL[key_field]
    if query_rank < key_rank:
        return TO_DETAILED
    if query_rank > key_rank:
        return TO_BRIEF
    return SAME_KIND


def tokenize_with_instruction(
    tokenizer: PreTrainedTokenizerBase,
    instructions: str | Sequence[str],
    captions: Sequence[str],
    max_len: int = MAX_TEXT_LEN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise ``instruction + caption`` per row, right-padded to the longest row, truncated to ``max_len`` (capped
    at 512). Returns long tensors ``input_ids``, ``attention_mask`` and ``pool_mask`` (b, L); ``pool_mask`` is the
    attention mask without the instruction's tokens.

    The joined string is tokenised, as LLM2Vec does, so the boundary tokenises as the model will see it; a token is
    an instruction token when it lies wholly inside the instruction's characters, so a token that merges the
    instruction's trailing space with the caption's first word counts as caption. Needs a fast tokenizer (offsets).
    """
    if isinstance(instructions, str):
        instructions = [instructions] * len(captions)
    if len(instructions) != len(captions) or not captions:
        raise ValueError(f"tokenize_with_instruction: {len(instructions)} instructions for {len(captions)} captions")
    if not tokenizer.is_fast:
        raise TypeError("tokenize_with_instruction needs a fast tokenizer (it reads character offsets)")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) first")
    max_len = min(max_len, MAX_TEXT_LEN)
    texts = [instruction + caption for instruction, caption in zip(instructions, captions)]
    encoded = tokenizer(
        texts,
        padding="longest",
        padding_side="right",  # RoPE positions 0..L-1 per row assume right padding
        truncation=True,
        max_length=max_len,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"].long()
    attention_mask = encoded["attention_mask"].long()
    ends = encoded["offset_mapping"][..., 1]  # (b, L) end character of each token
    special = encoded["special_tokens_mask"].bool()
    limits = torch.tensor([len(instruction) for instruction in instructions])[:, None]
    in_instruction = ~special & (ends <= limits) & (limits > 0)
    pool_mask = attention_mask * (~in_instruction).long()
    # Special tokens always pool, so only a row whose caption was truncated away entirely can end up instruction-only.
    has_caption = ((pool_mask.bool() & ~special).sum(dim=1) > 0) | (
        torch.tensor([not caption.strip() for caption in captions])
    )
    if not bool(has_caption.all()):
        rows = (~has_caption).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows}: the instruction fills max_len={max_len}; no caption token is left to pool")
    return input_ids, attention_mask, pool_mask
