"""The MNTP pre-step (LLM2Vec): ``steps`` masked-next-token steps on stage 1's caption stream, before
caption-contrastive training. The masking, head and loss live in ``models/llm/mntp.py``.

As LLM2Vec does, MNTP trains its own LoRA (rank, alpha and targets of ``model.llm``; its own init seed), which is then
merged into the base weights (``W += alpha / r * B A`` in fp32, :func:`~llm2clip_scale.models.llm.lora.merge_lora`);
SimCSE then trains a fresh, zero-initialised LoRA on that merged base. The MNTP matrices are kept
(:data:`MNTP_LORA_FILE` in every checkpoint) so a resumed run rebuilds the same base (:func:`merge_saved_mntp`), and
a checkpoint's ``lora.safetensors`` holds both LoRAs as one of rank ``2r`` (the task's ``state``), so every tool that
merges a stage-1 LoRA onto the original base (stage 2's ``lora_init``, export, CRA) gets the trained tower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import Tensor

from llm2clip_scale.checkpoint.lora import global_lora_state, local_lora_state
from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.kernels import build_optimizer
from llm2clip_scale.models.llm.embed import TextBatch, concat_texts, run_schedule, split_micro_batches
from llm2clip_scale.models.llm.lora import apply_lora, lora_adapters, merge_lora, merge_lora_state
from llm2clip_scale.models.llm.mntp import build_mntp_head, mask_token_id, mask_tokens, mntp_loss
from llm2clip_scale.models.llm.tower import LLMTextEncoder
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


MNTP_LORA_FILE = "mntp_lora.safetensors"  # the merged MNTP LoRA, global (TP/PP-independent) keys
MNTP_LORA_SEED_OFFSET = 7919  # the MNTP LoRA's init seed is model.llm.seed + this: its A differs from SimCSE's


def run_mntp(trainer: LLM2CLIPCaptionContrastiveTask, steps: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``steps`` MNTP steps on the trainer's caption stream with an MNTP LoRA of its own, merged into the tower's base
    weights at the end (module doc). The trainer's SimCSE adapters must be untrained (B = 0): they are removed first,
    which leaves the weights exactly as they were; the caller attaches fresh ones after. Returns (first/final loss,
    the MNTP LoRA's global state). Collective over the world."""
    cfg, s1, llm = trainer.cfg, trainer.cfg.stage1, trainer.cfg.model.llm
    tower, device = trainer.tower, trainer.topo.device
    if any(bool(b.any()) for adapter in lora_adapters(tower).values() for b in adapter.B.values()):
        raise RuntimeError("MNTP runs before SimCSE: the tower's SimCSE LoRA has already been trained")
    merge_lora(tower)  # B = 0: W + 0, i.e. just detaches the SimCSE adapters
    params = apply_lora(tower, llm.lora_rank, llm.lora_alpha, llm.lora_dropout, llm.lora_targets,
                        seed=llm.seed + MNTP_LORA_SEED_OFFSET)
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
    state = global_lora_state(tower)
    merge_lora(tower)
    return {"steps": float(steps), "first_loss": losses[0], "final_loss": losses[-1]}, state


def merge_saved_mntp(tower: LLMTextEncoder, state: dict[str, Tensor], llm: LLMConfig) -> int:
    """Fold a checkpoint's MNTP LoRA (global keys, :data:`MNTP_LORA_FILE`) into this rank's base weight shards, as
    :func:`run_mntp` merged it, leaving the attached SimCSE adapters be; returns how many linears were merged.
    The run's alpha is the checkpoint's: the checkpoint manager refuses a resume under other LoRA settings."""
    ranks = {value.shape[0] for key, value in state.items() if ".A." in key}
    if ranks != {llm.lora_rank}:
        raise ValueError(f"{MNTP_LORA_FILE}: LoRA rank {sorted(ranks)} in the checkpoint, model.llm.lora_rank is "
                         f"{llm.lora_rank}; resume with the LoRA settings the run was started with")
    return merge_lora_state(tower, local_lora_state(tower, state), llm.lora_rank, llm.lora_alpha,
                            llm.lora_targets)
