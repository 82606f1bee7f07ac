"""Stage-1 test helpers: a tiny global batch of (query, positive, hard negative) token rows shared by the LoRA and
stage-1 tests, and the group-keeping collate the caption-pair stream tests read batches with."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llm2clip_scale.data.pairs import CaptionPair

PAIRS, WIDTH, INSTRUCTION_TOKENS = 8, 10, 2


def synthetic_pair_tokens(vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, pool), each (3, PAIRS, WIDTH): queries carry a 2-token 'instruction' left out of pooling.

    A positive shares two tokens with its query and its hard negative all but three with the positive, so SimCSE
    starts well above zero and a few steps move it without driving it to zero.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, WIDTH + 1, (3, PAIRS), generator=gen)
    query = torch.randint(0, vocab_size, (PAIRS, WIDTH), generator=gen)
    positive = torch.randint(0, vocab_size, (PAIRS, WIDTH), generator=gen)
    positive[:, 1:3] = query[:, 2:4]
    negative = positive.clone()
    negative[:, 3:6] = torch.randint(0, vocab_size, (PAIRS, 3), generator=gen)
    mask = (torch.arange(WIDTH)[None, None, :] < lengths[:, :, None]).long()
    pool = mask.clone()
    pool[0, :, :INSTRUCTION_TOKENS] = 0
    return torch.stack([query, positive, negative]), mask, pool


def collate_groups(pairs: list[CaptionPair]) -> dict:
    """A stand-in collate for PairBatches: each pair's source group (path@offset) and the pairs themselves."""
    return {"groups": [p.group for p in pairs], "pairs": list(pairs)}


def take(stream: Iterator[dict], n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]
