"""Caption formats and instructions: how captions become token rows with a pooling mask, for every text path.

Every path that feeds the LLM (stage-1 pairs, stage-2 online captions, offline sidecars, CRA, export) tokenises
with :func:`tokenize_captions`, so one setting, ``model.llm.caption_format``, decides what the tower sees:

- ``plain``: the tokenizer's own special tokens around ``instruction + caption``; the caption's tokens and the
  special tokens (BOS/EOS) are pooled, the instruction's are not, so an empty instruction pools every token.
- ``llm2vec``: the format LLM2CLIP's released Llama-3 embedder was trained on (llm2vec's Meta-Llama-3-8B-Instruct
  path): ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{instruction }{caption}<|eot_id|>``, and
  llm2vec's embed mask: only the last n tokens are pooled, n being the token count of ``caption + <|eot_id|>`` on
  its own — so BOS, the chat header and the instruction are attended to but never averaged, ``<|eot_id|>`` is.

An instruction tells the bidirectional LLM what the embedding is for ("retrieve a detailed caption"); the caption
tokens attend to it, but only the caption's own tokens are averaged into the embedding.
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


CAPTION_FORMATS = ("plain", "llm2vec")
LLAMA3_USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_END_OF_TURN = "<|eot_id|>"


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    caption_format: str = "plain",
    instructions: str | Sequence[str] = "",
    max_len: int = MAX_TEXT_LEN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``captions`` (with ``instructions``: one for all or one per row; "" for none) as right-padded long tensors
    ``input_ids``, ``attention_mask`` and ``pool_mask`` (b, L) in ``caption_format`` (see the module docstring),
    at most ``max_len`` (capped at 512) tokens a row. Raises ValueError when an instruction leaves no room for the
    caption, or when the tokenizer lacks the format's special tokens."""
    if isinstance(instructions, str):
        instructions = [instructions] * len(captions)
    if len(instructions) != len(captions) or not captions:
        raise ValueError(f"tokenize_captions: {len(instructions)} instructions for {len(captions)} captions")
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) first")
    max_len = min(max_len, MAX_TEXT_LEN)
    if caption_format == "plain":
        return _tokenize_plain(tokenizer, instructions, captions, max_len)
    if caption_format == "llm2vec":
        return _tokenize_llm2vec(tokenizer, instructions, captions, max_len)
    raise ValueError(f"caption format {caption_format!r} unknown; use one of {', '.join(CAPTION_FORMATS)}")


def check_llm2vec_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """The llm2vec format needs Llama-3's chat tokens as single special tokens; raise ValueError naming the fix."""
    missing = [token for token in ("<|start_header_id|>", "<|end_header_id|>", LLAMA3_END_OF_TURN)
               if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise ValueError(f"model.llm.caption_format=llm2vec: the tokenizer does not have {missing} as single "
                         "tokens; it is the Llama-3 chat format — use caption_format=plain for other tokenizers")


def _tokenize_llm2vec(
    tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], captions: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_llm2vec_tokenizer(tokenizer)
    end_ids = tokenizer(LLAMA3_END_OF_TURN, add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    pooled_from: list[int] = []
    for row, (instruction, caption) in enumerate(zip(instructions, captions)):
        # llm2vec joins "instruction !@#$%^&*()caption", strips the whole and splits at the separator: the pooled
        # part is the caption without trailing whitespace, plus the end-of-turn token.
        pooled_text = caption.rstrip() + LLAMA3_END_OF_TURN
        prompt = f"{instruction.strip()} " if instruction.strip() else ""
        ids = tokenizer(LLAMA3_USER_HEADER + prompt + pooled_text)["input_ids"]
        start = len(ids) - len(tokenizer(pooled_text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_len:
            # Cut the caption's end, never <|eot_id|>: llm2vec truncates the joined row instead, which drops the
            # pooled end token and shifts its last-n mask onto the instruction.
            ids = ids[: max_len - len(end_ids)] + end_ids
        if start >= len(ids) - len(end_ids) and caption.strip():
            raise ValueError(f"row {row}: the chat header and instruction fill max_len={max_len}; no caption token "
                             "is left to pool")
        rows.append(ids)
        pooled_from.append(start)
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    pool_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, (ids, start) in enumerate(zip(rows, pooled_from)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        pool_mask[row, start : len(ids)] = 1
    return input_ids, attention_mask, pool_mask


def _tokenize_plain(
    tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], captions: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain format: ``instruction + caption`` per row with the tokenizer's special tokens, right-padded to the
    longest row, truncated to ``max_len``; ``pool_mask`` is the attention mask without the instruction's tokens.

    The joined string is tokenised, as LLM2Vec does, so the boundary tokenises as the model will see it; a token is
    an instruction token when it lies wholly inside the instruction's characters, so a token that merges the
    instruction's trailing space with the caption's first word counts as caption. Needs a fast tokenizer (offsets).
    """
    if not tokenizer.is_fast:
        raise TypeError("tokenize_captions needs a fast tokenizer (it reads character offsets)")
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
