"""LLM2CLIP stage 1 (``train.stage=llm2clip_cc``): caption-contrastive LoRA fine-tuning of the LLM text tower.

The path of one step, top to bottom (megatron layout: caption pairs are split over LLM data parallelism, the TP x PP
ranks of one model replica read the same pairs):

  caption pairs of this DP rank -> (query, positive, hard negative) token rows -> gradient caching over
  micro-batches (train/grad_cache.py: embed all without grad, SimCSE over the DP group, replay with the surrogate
  loss through megatron's schedule) -> LoRA gradients averaged over LLM-DP -> clip -> AdamW -> warmup-cosine lr.

CRA (caption-retrieval accuracy) is measured before training (the untuned tower), every ``eval.interval`` steps
and at the end. Every checkpoint holds the LoRA adapters and their optimizer state sharded (``llm/``, reshardable
to any TP/PP) and, for tools, one TP/PP-independent file ``<checkpoint.dir>/step<N>/lora.safetensors``.

With ``stage1.mntp_steps`` the MNTP pre-step first trains its own LoRA and merges it into the base (LLM2Vec's
order; ``train/mntp.py``); checkpoints then also hold it (``mntp_lora.safetensors``, merged again on resume), and
``lora.safetensors`` is MNTP's and SimCSE's LoRA concatenated (rank ``2r``, alpha ``2 alpha``: the same update), so
tools that merge it onto the original base get the trained tower.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from llm2clip_scale.checkpoint.layout import ADAPTER_CONFIG_FILE, LORA_FILE, read_adapter_config
from llm2clip_scale.checkpoint.lora import (
    load_global_lora_state,
    resolve_lora_path,
)
from llm2clip_scale.checkpoint.manager import TaskState
from llm2clip_scale.config.load import validate
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.pair_stream import PairBatches
from llm2clip_scale.data.pairs import PairCollator, batch_pairs, iter_caption_pairs
from llm2clip_scale.data.samples import load_tokenizer
from llm2clip_scale.data.shards import SkipCounter
from llm2clip_scale.distributed.collectives import all_gather_rows, sum_over_ranks
from llm2clip_scale.distributed.topology import Topology, build_topology, init_distributed
from llm2clip_scale.eval.cra import caption_retrieval_accuracy, evaluate_cra
from llm2clip_scale.losses.simcse import simcse_loss
from llm2clip_scale.models.llm.embed import TextBatch, concat_texts, embed_texts
from llm2clip_scale.models.llm.lora import apply_lora, concat_lora_states
from llm2clip_scale.models.llm.tower import LLMTextEncoder, build_text_tower
from llm2clip_scale.train.grad_cache import grad_cache_step
from llm2clip_scale.train.llm_lora import LoRATrainer
from llm2clip_scale.train.loop import run
from llm2clip_scale.train.task import StepOutput

log = logging.getLogger("llm2clip_scale.train")


def build_lora_tower(cfg: Config, dtype: torch.dtype, device: torch.device, lora: str | Path | None = None,
                     trainable: bool = True) -> tuple[LLMTextEncoder, list[nn.Parameter]]:
    """This rank's tower shard with LoRA adapters (``model.llm.lora_*``), loaded from ``lora`` when given; the rank,
    alpha and targets are then the file's (its ``adapter_config.json``: an MNTP run's file is of rank ``2r``)."""
    llm = cfg.model.llm
    tower = build_text_tower(llm, params_dtype=dtype, trainable=trainable, device=device)
    rank, alpha, targets = llm.lora_rank, llm.lora_alpha, list(llm.lora_targets)
    lora_file = None if lora is None else resolve_lora_path(lora)
    if lora_file is not None:
        meta = read_adapter_config(lora_file)
        rank, alpha, targets = meta["lora_rank"], meta["lora_alpha"], meta["lora_targets"]
    params = apply_lora(tower, rank, alpha, llm.lora_dropout, targets)
    if lora_file is not None:
        load_global_lora_state(tower, load_file(str(lora_file)))
    return tower, params


# ----------------------------------------------------------------------------------------------------------- data


def pair_collator(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PairCollator:
    """Pairs -> token rows as the config says: caption format, length and instruction ("auto": PairCollator picks
    it by the pair's direction, short -> detailed caption or back)."""
    instruction = None if cfg.model.llm.instruction == "auto" else cfg.model.llm.instruction
    return PairCollator(tokenizer, instruction, cfg.data.max_text_len, cfg.model.llm.caption_format)


def cra_collator(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> PairCollator:
    """Pairs -> token rows for CRA: the training format, with stage1.eval_instruction on the queries ("" by default:
    the paper's protocol has no prefix; "auto": as trained)."""
    instruction = None if cfg.stage1.eval_instruction == "auto" else cfg.stage1.eval_instruction
    return PairCollator(tokenizer, instruction, cfg.data.max_text_len, cfg.model.llm.caption_format)


def _side(batch: dict, side: str) -> TextBatch:
    return TextBatch(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_pool_mask"])


def eval_batches(cfg: Config, collate: PairCollator, dp_rank: int, dp_size: int, skips: SkipCounter) -> list[dict]:
    """This DP rank's share of the first ``eval.max_samples`` CRA pairs (caption eval_fields[0] -> [1])."""
    s1 = cfg.stage1
    assert s1.eval_pairs is not None
    pairs = iter_caption_pairs(
        s1.eval_pairs, skips, fields=s1.eval_fields, rank=dp_rank, world_size=dp_size, seed=cfg.train.seed,
        random_direction=False, hard_negatives=False, deal=True,
    )
    # Pairs are dealt round-robin over the whole split (every rank reads it all: CRA needs exactly the first
    # max_samples pairs), so the first max_samples pairs give this rank these many.
    mine = len(range(dp_rank, cfg.eval.max_samples, dp_size))
    return list(batch_pairs(itertools.islice(pairs, mine), collate, cfg.eval.batch_size, keep_partial=True))


@torch.no_grad()
def pairs_cra(tower: LLMTextEncoder, batches: list[dict], micro_batch_size: int, device: torch.device) -> dict:
    """CRA over the pairs of every LLM-DP rank (TP/PP ranks of a replica hold the same ``batches``).

    PP = 1 uses ``eval.cra.evaluate_cra``. Under PP its pipeline path pools over the attention mask (no
    instructions), so the pairs go through grad_cache's schedule-driven ``embed_texts``, which takes pooling masks.
    """
    dp_group = parallel_state.get_data_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return evaluate_cra(tower, batches, tp_group=None, gather_group=dp_group, device=device)
    was_training = tower.training
    tower.eval()
    try:
        sides = [[embed_texts(tower, _side(b, side).to(device), micro_batch_size) for b in batches]
                 for side in ("query", "positive")]
    finally:
        tower.train(was_training)
    hidden = tower.config.hidden_size
    local = [torch.cat(s) if s else torch.empty(0, hidden, device=device) for s in sides]
    both, _ = all_gather_rows(torch.stack(local, dim=1), group=dp_group)
    return {"cra": caption_retrieval_accuracy(both[:, 0], both[:, 1]), "num_pairs": float(both.shape[0])}


# ------------------------------------------------------------------------------------------------------- training


class LLM2CLIPCaptionContrastiveTask:
    """LLM2CLIP stage 1 for the one loop (train/loop.py): LoRA on the TP x PP sharded tower, SimCSE, grad caching."""

    name = "llm2clip_cc"

    def build(self, cfg: Config, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        # LoRA dropout masks come from the default generator: the ranks of one model replica (TP shards must agree,
        # and PP stages replay them in pass 2) share a seed, different replicas draw different masks.
        torch.manual_seed(cfg.train.seed * 1000 + topo.llm_dp_rank)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.tokenizer = load_tokenizer(cfg.model.llm.tokenizer)
        if len(self.tokenizer) > cfg.model.llm.vocab_size:
            raise ValueError(f"model.llm.vocab_size {cfg.model.llm.vocab_size} < tokenizer vocabulary "
                             f"{len(self.tokenizer)} ({cfg.model.llm.tokenizer})")
        self.tower = build_text_tower(cfg.model.llm, params_dtype=self.dtype, trainable=True, device=topo.device)
        self.lora = LoRATrainer(self.tower, cfg)
        self.params = self.lora.params
        self.tower.train()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.collate = pair_collator(cfg, self.tokenizer)
        self.skips = SkipCounter("stage1 train pairs")
        self.eval_skips = SkipCounter("stage1 eval pairs")
        self._eval_batches: list[dict] | None = None
        self.mntp_state: dict[str, Tensor] | None = None  # the merged MNTP LoRA (global keys), once there is one
        self.pairs = PairBatches(cfg, self.collate, topo.llm_dp_rank, topo.llm_dp_size, self.skips)
        self.max_replay_error = 0.0

    def train_batches(self) -> Iterator[dict]:
        """A fresh stream from the start (MNTP's own pass over the pairs)."""
        return iter(PairBatches(self.cfg, self.collate, self.topo.llm_dp_rank, self.topo.llm_dp_size, self.skips))

    def before_training(self) -> dict:
        result: dict = {}
        before = self.evaluate()
        if before is not None:
            result["cra_before"] = before["cra"]
            log.info("CRA before training: %.4f over %d pairs", before["cra"], before["num_eval_pairs"])
        if self.cfg.stage1.mntp_steps > 0:
            from llm2clip_scale.train.mntp import run_mntp

            result["mntp"], self.mntp_state = run_mntp(self, self.cfg.stage1.mntp_steps)
            # SimCSE's LoRA, fresh (B = 0) on the merged base, with a fresh optimizer and schedule.
            self.lora = LoRATrainer(self.tower, self.cfg)
            self.params = self.lora.params
            log.info("MNTP: %d steps, loss %.4f -> %.4f", self.cfg.stage1.mntp_steps, result["mntp"]["first_loss"],
                     result["mntp"]["final_loss"])
        return result

    def batches(self) -> Iterator[dict]:
        return iter(self.pairs)

    def evaluate(self) -> dict | None:
        if self.cfg.stage1.eval_pairs is None:
            return None
        if self._eval_batches is None:
            collate = cra_collator(self.cfg, self.tokenizer)
            self._eval_batches = eval_batches(self.cfg, collate, self.topo.llm_dp_rank, self.topo.llm_dp_size,
                                              self.eval_skips)
        metrics = pairs_cra(self.tower, self._eval_batches, self.cfg.eval.batch_size, self.topo.device)
        return {"cra": metrics["cra"], "num_eval_pairs": int(metrics["num_pairs"])}

    def step(self, batch: dict) -> StepOutput:
        s1 = self.cfg.stage1
        roles = ["query", "positive"] + (["negative"] if "negative_input_ids" in batch else [])
        texts = concat_texts([_side(batch, role) for role in roles]).to(self.topo.device)
        b = len(batch["groups"])

        def loss_fn(embeddings: Tensor) -> Tensor:
            parts = embeddings.split(b)
            negatives = parts[2] if len(parts) > 2 else None
            return simcse_loss(parts[0], parts[1], negatives, s1.temperature, group=self.dp_group)

        self.lora.zero_grad()
        # One micro-batch holds micro_batch pairs: their query, positive and negative rows.
        cached = grad_cache_step(self.tower, texts, loss_fn, self.cfg.train.micro_batch * len(roles))
        lr = self.lora.lr
        grad_norm, applied = self.lora.step(also_skip=not math.isfinite(cached.loss))
        if applied:
            self.max_replay_error = max(self.max_replay_error, cached.replay_error)
        return StepOutput(loss=cached.loss, applied=applied, metrics={
            "lr": lr, "grad_norm": grad_norm, "replay_error": cached.replay_error,
            "micro_batches": float(cached.num_microbatches)})

    def skipped_samples(self) -> int:
        # Each LLM-DP rank reads (or, for data every rank reads, counts) its own share of the source, so the total
        # is the sum over the DP group; TP/PP ranks of one replica read the same pairs and are counted once.
        return sum_over_ranks(sum(self.skips.counts.values()), self.topo.device, group=self.dp_group)

    def data_key(self) -> tuple:
        return ("llm_dp", self.topo.llm_dp_rank, self.topo.llm_dp_size)

    def state(self) -> TaskState:
        llm_state, shared = self.lora.checkpoint_parts()
        if self.mntp_state is not None:
            from llm2clip_scale.train.mntp import MNTP_LORA_FILE

            llm = self.cfg.model.llm
            shared[MNTP_LORA_FILE] = self.mntp_state
            # Both LoRAs have scaling alpha / r, so stacked they are one of rank 2r and alpha 2 alpha (module doc).
            simcse = shared[LORA_FILE]
            assert isinstance(simcse, dict)
            shared[LORA_FILE] = concat_lora_states(self.mntp_state, simcse)
            meta = json.loads(str(shared[ADAPTER_CONFIG_FILE]))
            meta.update(lora_rank=2 * llm.lora_rank, lora_alpha=2 * llm.lora_alpha,
                        mntp={"file": MNTP_LORA_FILE, "steps": self.cfg.stage1.mntp_steps,
                              "note": "lora.safetensors = MNTP LoRA (rows/columns 0..r-1) + SimCSE LoRA (r..2r-1)"})
            shared[ADAPTER_CONFIG_FILE] = json.dumps(meta, indent=2)
        return TaskState(
            llm=llm_state,
            shared=shared,
            rank={"pairs": self.pairs.state_dict(), "max_replay_error": self.max_replay_error},
        )

    def load_state(self, shared: dict, rank: dict | None) -> None:
        from llm2clip_scale.train.mntp import MNTP_LORA_FILE, merge_saved_mntp

        if MNTP_LORA_FILE in shared:
            # The checkpoint's SimCSE adapters were trained on the MNTP-merged base: rebuild it under them.
            self.mntp_state = shared[MNTP_LORA_FILE]
            merge_saved_mntp(self.tower, self.mntp_state, self.cfg.model.llm)
        elif self.cfg.stage1.mntp_steps > 0:
            log.warning("stage1.mntp_steps=%d but the checkpoint holds no %s (written without MNTP, or by a version "
                        "that trained MNTP into the SimCSE LoRA); resuming without merging one",
                        self.cfg.stage1.mntp_steps, MNTP_LORA_FILE)
        if rank is not None:
            self.pairs.load_state_dict(rank["pairs"])
            self.max_replay_error = rank["max_replay_error"]
        else:
            self.pairs.epoch = 1  # a fresh shuffle rather than a replay of the first batches

    def finish(self) -> dict:
        return {"max_replay_error": self.max_replay_error, "skipped": dict(self.skips.counts)}


def train_llm2clip_cc(cfg: Config) -> dict:
    """Train LLM2CLIP stage 1 from ``cfg``; returns the final metrics (on every rank)."""
    return run(cfg, LLM2CLIPCaptionContrastiveTask())


def evaluate_checkpoint_cra(cfg: Config, lora: str | Path | None = None) -> dict:
    """CRA of the (TP x PP sharded) tower on ``stage1.eval_pairs``, with LoRA adapters from ``lora`` (a stage-1
    checkpoint file, step directory or root) or untuned. Collective; every rank returns the same dict."""
    if cfg.stage1.eval_pairs is None:
        raise ValueError("stage1.eval_pairs: not set; give the CRA split (shards or pair files)")
    validate(cfg)
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    topo = build_topology(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    tower, _ = build_lora_tower(cfg, dtype, topo.device, lora=lora, trainable=False)
    tokenizer = load_tokenizer(cfg.model.llm.tokenizer)
    collate = cra_collator(cfg, tokenizer)
    skips = SkipCounter("cra pairs")
    batches = eval_batches(cfg, collate, topo.llm_dp_rank, topo.llm_dp_size, skips)
    result = pairs_cra(tower, batches, cfg.eval.batch_size, topo.device)
    return {"cra": result["cra"], "num_pairs": int(result["num_pairs"]), "chance": 1.0 / max(result["num_pairs"], 1),
            "lora": None if lora is None else str(resolve_lora_path(lora)), "skipped_pairs": sum(skips.counts.values())}
