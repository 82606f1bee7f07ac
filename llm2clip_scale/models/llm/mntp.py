"""MNTP (masked next-token prediction, LLM2Vec): the optional stage-1 pre-step that teaches the now bidirectional
LLM to use its right context, before caption-contrastive training.

A share ``p`` (0.2) of each caption's ordinary tokens is selected; as in BERT, 80% of them become a mask token, 10% a
random token and 10% stay. Token i is predicted from the final hidden state at position i-1 (the LM's next-token
head, hence "next token"), cross-entropy over the selected tokens only.

The tower has no LM head (an embedder does not need one), so MNTP builds a frozen vocab-parallel head for its own
use and drops it afterwards: the checkpoint's ``lm_head.weight`` (or the input embedding for tied-embedding
models), or, for the random tiny towers, the seeded input embedding (tied). Only the LoRA adapters train, and they
carry on into SimCSE (LLM2Vec merges the MNTP adapters and starts fresh ones; keeping one set keeps stage 1's
output a single adapter file). Steps run through megatron's schedule, so MNTP works under TP and PP.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.models.llm.tower import LLMTextEncoder
from llm2clip_scale.train.grad_cache import TextBatch, concat_texts, run_schedule, split_micro_batches

if TYPE_CHECKING:
    from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask

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


def _loss_func(head: ColumnParallelLinear | None, chunks: list[TextBatch]) -> Callable[[int, Tensor], tuple]:
    def loss_func(index: int, hidden: Tensor) -> tuple[Tensor, dict]:
        # Called on the last pipeline stage only, which is where the head was built.
        assert head is not None
        loss = mntp_loss(head, hidden, chunks[index].pool_mask)
        # A copy: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"mntp": loss.detach().clone()}

    return loss_func


def run_mntp(trainer: LLM2CLIPCaptionContrastiveTask, steps: int) -> dict[str, float]:
    """``steps`` MNTP steps on the trainer's caption stream and LoRA parameters; returns first/final loss."""
    from llm2clip_scale.train.llm2clip_cc import average_over_data_parallel, clip_grad_norm

    cfg, s1 = trainer.cfg, trainer.cfg.stage1
    tower, params, device = trainer.tower, trainer.params, trainer.topo.device
    head = build_mntp_head(tower, cfg.model.llm) if parallel_state.is_pipeline_last_stage() else None
    optimizer = torch.optim.AdamW(params, lr=s1.mntp_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=0.0)
    tokenizer = trainer.tokenizer
    mask_id = mask_token_id(tokenizer)
    special = list(tokenizer.all_special_ids)
    # Same corruption on every rank of a model replica (TP shards and PP stages see one batch), different per DP.
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + 7919 + trainer.topo.llm_dp_rank)
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    dp_group = parallel_state.get_data_parallel_group()
    batches: Iterator[dict] = trainer.train_batches()
    losses: list[float] = []
    for _ in range(steps):
        batch = next(batches)
        roles = [r for r in ("query", "positive", "negative") if f"{r}_input_ids" in batch]
        texts = concat_texts([TextBatch(batch[f"{r}_input_ids"], batch[f"{r}_attention_mask"],
                                        batch[f"{r}_pool_mask"]) for r in roles])
        ids, labels = mask_tokens(texts.input_ids, texts.attention_mask, special, mask_id, len(tokenizer),
                                  s1.mntp_probability, generator)
        # Labels ride in the pool-mask slot: the tower ignores it when it returns hidden states.
        chunks, _ = split_micro_batches(TextBatch(ids, texts.attention_mask, labels).to(device),
                                        cfg.train.micro_batch * len(roles), uniform=pipelined)
        for p in params:
            p.grad = None
        reports = run_schedule(tower, chunks, _loss_func(head, chunks), forward_only=False, return_hidden_states=True)
        average_over_data_parallel(params)
        clip_grad_norm(params, cfg.optim.grad_clip)
        optimizer.step()
        value = torch.zeros(1, dtype=torch.float64, device=device)
        if reports:
            value[0] = sum(float(r["mntp"]) for r in reports) / len(reports)
        if pipelined:
            dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(value, group=dp_group)
        losses.append(float(value) / dist.get_world_size(dp_group))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite MNTP loss {losses[-1]}")
    return {"steps": float(steps), "first_loss": losses[0], "final_loss": losses[-1]}


__all__ = ["build_mntp_head", "mask_token_id", "mask_tokens", "mntp_loss", "run_mntp"]
