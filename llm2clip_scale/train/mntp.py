"""The MNTP pre-step's training loop (LLM2Vec): ``steps`` masked-next-token steps on stage 1's caption stream and LoRA
parameters, before caption-contrastive training. The masking, head and loss live in ``models/llm/mntp.py``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import Tensor

from llm2clip_scale.kernels import build_optimizer
from llm2clip_scale.models.llm.embed import TextBatch, concat_texts, run_schedule, split_micro_batches
from llm2clip_scale.models.llm.mntp import build_mntp_head, mask_token_id, mask_tokens, mntp_loss
from llm2clip_scale.train.llm_lora import average_over_data_parallel, clip_grad_norm

if TYPE_CHECKING:
    from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask


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
    cfg, s1 = trainer.cfg, trainer.cfg.stage1
    tower, params, device = trainer.tower, trainer.params, trainer.topo.device
    head = build_mntp_head(tower, cfg.model.llm) if parallel_state.is_pipeline_last_stage() else None
    optimizer = build_optimizer(params, lr=s1.mntp_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
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
