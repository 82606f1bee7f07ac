"""MNTP (masked next-token prediction, LLM2Vec): the optional stage-1 pre-step that teaches the now bidirectional
LLM to use its right context, before caption-contrastive training.

A share ``p`` (0.2) of each caption's ordinary tokens is selected; as in BERT, 80% of them become a mask token, 10% a
random token and 10% stay. Token i is predicted from the final hidden state at position i-1 (the LM's next-token
head, hence "next token"), cross-entropy over the selected tokens only.

The tower has no LM head (an embedder does not need one), so MNTP builds a frozen vocab-parallel head for its own
use and drops it afterwards: the checkpoint's ``lm_head.weight`` (or the input embedding for tied-embedding
models), or, for the random tiny towers, the seeded input embedding (tied). Only a LoRA of MNTP's own trains; as in
LLM2Vec it is merged into the base weights before SimCSE starts fresh adapters (``train/mntp.py``, which runs the
steps through megatron's schedule, so MNTP works under TP and PP).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.models.llm.tower import LLMTextEncoder

MASK_FALLBACK = "_"  # LLM2Vec's mask token for tokenizers without one (Llama)


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's mask token, else ``_`` (LLM2Vec's choice for Llama), else the unknown token."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    fallback = tokenizer.convert_tokens_to_ids(MASK_FALLBACK)
    if fallback is not None and fallback != tokenizer.unk_token_id:
        return int(fallback)
    if tokenizer.unk_token_id is None:
        raise ValueError("MNTP: the tokenizer has neither a mask token, '_', nor an unknown token to mask with")
    return int(tokenizer.unk_token_id)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT-style corruption of ordinary tokens; returns (corrupted ids, labels) with label -100 = not predicted.

    Position 0 is never selected: nothing precedes it to predict it from.
    """
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    eligible[:, 0] = False
    chosen = eligible & (torch.rand(input_ids.shape, generator=generator) < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    corrupted = torch.where(chosen & (roll < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, labels


def build_mntp_head(tower: LLMTextEncoder, cfg: LLMConfig) -> ColumnParallelLinear:
    """A frozen vocab-parallel LM head (hidden -> vocab/TP rows of this rank), filled as the module docstring says."""
    from llm2clip_scale.models.llm.hf_import import SafetensorsSource, SeededSource

    config = tower.config
    head = ColumnParallelLinear(
        config.hidden_size, cfg.vocab_size, config=config, init_method=lambda _w: None, bias=False,
        gather_output=False, skip_bias_add=True,
    )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    rows = head.weight.shape[0]
    start, stop = tp_rank * rows, (tp_rank + 1) * rows
    with contextlib.ExitStack() as stack:
        if cfg.hf_checkpoint:
            source = SafetensorsSource(cfg.hf_checkpoint, stack)
            names = source.names()
            candidates = ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight")
            name = next((n for n in candidates if n in names), None)
            if name is None:
                raise KeyError(f"MNTP: {cfg.hf_checkpoint} has no lm_head.weight or embed_tokens.weight")
        else:
            source, name = SeededSource(cfg), "model.embed_tokens.weight"
        weight = source.read(name, 0, start, stop)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
    head.weight.requires_grad_(False)
    return head.to(next(tower.parameters()).device)


def mntp_loss(head: ColumnParallelLinear, hidden: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the tokens ``labels`` selects (!= -100), each predicted from the previous position.

    ``hidden``: (b, L, hidden) final-norm states. Logits stay vocab-parallel; megatron's cross-entropy reduces
    over the TP group, so no rank ever holds a full (b, L, vocab) tensor.
    """
    logits, _ = head(hidden[:, :-1])
    targets = labels[:, 1:]
    selected = targets != -100
    losses = vocab_parallel_cross_entropy(logits.float().contiguous(), targets.clamp(min=0))
    count = selected.sum().clamp(min=1)
    return (losses * selected).sum() / count


__all__ = ["build_mntp_head", "mask_token_id", "mask_tokens", "mntp_loss"]
