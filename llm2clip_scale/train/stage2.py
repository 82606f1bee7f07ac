"""Stage 2 (LLM2CLIP): frozen LLM embeds captions online; vision tower + adapter + logit scale train contrastively.

The path of one batch, top to bottom:
  loader (this rank's b samples) -> TP group embeds its ranks' captions once (frozen LLM) -> DeepSpeed engine
  (vision tower + adapter) -> InfoNCE over features gathered across the world -> engine.backward/step -> checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from llm2clip_scale.checkpoint.manager import TaskState
from llm2clip_scale.config.schema import Config, trains_offline
from llm2clip_scale.data.loader import build_eval_loader, build_train_loader
from llm2clip_scale.distributed.collectives import equal_row_counts, gather_in_sample_order
from llm2clip_scale.distributed.topology import Topology
from llm2clip_scale.eval.encoders import Stage2Encoders
from llm2clip_scale.eval.retrieval import retrieval_recall
from llm2clip_scale.eval.task_config import LLM_TASKS
from llm2clip_scale.eval.tasks import EvalTasks
from llm2clip_scale.losses import ContrastiveLoss, build_contrastive_loss
from llm2clip_scale.losses.proclip import self_distillation_loss
from llm2clip_scale.models.clip import build_clip_model
from llm2clip_scale.models.llm.embed import backprop_local_batch, embed_local_batch
from llm2clip_scale.models.llm.tower import build_text_tower
from llm2clip_scale.train.ema import EMATeacher
from llm2clip_scale.train.engine import build_engine, clamp_logit_scale
from llm2clip_scale.train.llm_lora import LoRATrainer
from llm2clip_scale.train.loop import run
from llm2clip_scale.train.task import EngineTask, StepOutput

log = logging.getLogger("llm2clip_scale.train")

EMA_FILE = "shared/ema_teacher.safetensors"


def _check_tokenizer_fits(cfg: Config) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(cfg.model.llm.tokenizer))
    if vocab > cfg.model.llm.vocab_size:
        raise ValueError(
            f"model.llm.vocab_size: {cfg.model.llm.vocab_size} is smaller than the tokenizer's vocabulary ({vocab}) "
            f"at {cfg.model.llm.tokenizer}; raise vocab_size or use the LLM's own tokenizer"
        )


def needs_llm(cfg: Config) -> bool:
    """Online mode embeds captions with the frozen LLM; offline mode reads sidecar embeddings and builds none."""
    eval_online = bool(cfg.data.eval_shards) and cfg.data.eval_embedding_shards is None
    return not trains_offline(cfg.data) or eval_online or any(t in LLM_TASKS for t in cfg.eval.tasks)


def caption_embeddings(batch: dict, text_tower: torch.nn.Module | None, tp_group, device: torch.device) -> torch.Tensor:
    """(b, hidden) LLM embeddings of a batch's captions: read from sidecars (offline) or embedded by the frozen tower
    (online; collective over the TP group, every member with its own captions)."""
    if "llm_embeddings" in batch:
        return batch["llm_embeddings"].to(device)
    return embed_local_batch(text_tower, batch["input_ids"].to(device), batch["attention_mask"].to(device), tp_group,
                             pool_mask=batch["pool_mask"].to(device))


@dataclass
class Features:
    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None


class Stage2Step:
    """One micro-batch forward/backward: the composition of towers, loss and engine.

    Text comes either from the frozen LLM (online: the TP group embeds its ranks' captions once) or from the batch
    (offline: ``llm_embeddings`` read from sidecar shards, no LLM in the loop). With ``lora`` (online, ``model.llm.
    lora_rank > 0``) LoRA adapters on the frozen LLM train too, by gradient caching: the captions are embedded
    without autograd, the engine's backward yields d(loss)/d(embedding), and a second tower pass back-propagates it
    (``embed.backprop_local_batch``); the LoRA step follows the engine's at the accumulation boundary.
    """

    def __init__(
        self,
        engine,
        text_tower: torch.nn.Module | None,
        topo: Topology,
        dtype: torch.dtype,
        loss_fn: ContrastiveLoss,
        teacher: EMATeacher | None = None,
        self_distill_weight: float = 0.0,
        lora: LoRATrainer | None = None,
        self_distill_reduction: str = "mean",
    ) -> None:
        self.engine = engine
        self.text_tower = text_tower
        self.topo = topo
        self.dtype = dtype
        self.loss_fn = loss_fn
        self.teacher = teacher
        self.self_distill_weight = self_distill_weight
        self.self_distill_reduction = self_distill_reduction
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.lora = lora
        self.lora_grad_norm = 0.0
        self.model_parallel_size = topo.tp_size * topo.pp_size

    def features(self, batch: dict, llm: torch.Tensor | None = None) -> Features:
        images = batch["images"].to(self.topo.device, self.dtype)
        if llm is None:
            llm = caption_embeddings(batch, self.text_tower, self.tp_group, self.topo.device)
        image, text, scale, bias = self.engine(images, llm.to(self.dtype))
        # The loss runs in fp32 whatever the tower precision: bf16 logits at scale 100 lose the ranking.
        return Features(image.float(), text.float(), scale.float(), None if bias is None else bias.float())

    def __call__(self, batch: dict) -> torch.Tensor:
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch; returns the
        local loss as a device scalar, for the loop to read with the step's other values in one transfer."""
        # Training micro-batches have train.micro_batch rows on every rank, so the feature and caption gathers need
        # not exchange row counts (evaluation, with a short last batch, calls features() outside this block).
        with equal_row_counts():
            loss = self._forward_backward(batch)
        # Asked before step(): DeepSpeed's answer refers to the micro-step that step() is about to finish.
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        # A skipped (non-finite) step leaves the student as it was; the teacher and the LoRA must not move either.
        applied = boundary and self.engine.was_step_applied()
        if applied:
            clamp_logit_scale(self.engine.module)
            if self.teacher is not None:
                self.teacher.update(self.engine.module.vision)
        if boundary and self.lora is not None:
            self.lora_grad_norm, _ = self.lora.step(also_skip=not applied)
        return loss.detach()

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        llm = caption_embeddings(batch, self.text_tower, self.tp_group, self.topo.device)
        if self.lora is not None:
            llm = llm.detach().requires_grad_(True)  # the engine's backward leaves d(loss)/d(embedding) here
        features = self.features(batch, llm)
        loss = self.loss_fn(features.image, features.text, features.scale, features.bias)
        if self.teacher is not None:
            teacher_features = self.teacher(batch["images"].to(self.topo.device))
            loss = loss + self.self_distill_weight * self_distillation_loss(
                features.image, teacher_features, reduction=self.self_distill_reduction)
        self.engine.backward(loss)
        if self.lora is not None:
            self._backprop_into_lora(batch, llm.grad)
        return loss

    def _backprop_into_lora(self, batch: dict, grad: torch.Tensor) -> None:
        # The engine averages its gradients over the world (the mean of the ranks' local losses). The tower pass sums
        # the gradients of its model-parallel group's rows and LoRATrainer.step averages over LLM-DP, so dividing by
        # the model-parallel size here makes the LoRA gradient that same mean.
        device = self.topo.device
        backprop_local_batch(self.text_tower, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             batch["pool_mask"].to(device), grad / self.model_parallel_size,
                             self.tp_group)


@torch.no_grad()
def evaluate(step_fn: Stage2Step, cfg: Config, topo: Topology, tasks: EvalTasks) -> dict | None:
    """The eval.tasks that have data (docs/EVAL.md), or None when none has: long_retrieval's R@k keep their plain
    names (r1_i2t, ..., chance, num_samples); the LLM tasks report ``<task>/<metric>``, through ``tasks`` (from
    :func:`eval_tasks`, kept by the run, so their sets are read once). Collective."""
    step_fn.engine.eval()
    try:
        metrics: dict = {}
        if "long_retrieval" in cfg.eval.tasks and cfg.data.eval_shards:
            metrics.update(_long_retrieval(step_fn, cfg, topo))
        llm_tasks = [t for t in cfg.eval.tasks if t in LLM_TASKS]
        if llm_tasks:
            metrics.update(tasks.run(llm_tasks))
    finally:
        step_fn.engine.train()
    return metrics or None


def eval_tasks(step_fn: Stage2Step, cfg: Config, topo: Topology) -> EvalTasks:
    """The paper-protocol eval tasks over this run's towers (the live modules: later calls see later weights)."""
    encoders = Stage2Encoders(step_fn.engine.module, step_fn.text_tower, step_fn.tp_group,
                              cfg.model.llm.tokenizer or None, cfg.model.llm.caption_format, cfg.data.max_text_len,
                              step_fn.dtype, topo.device)
    return EvalTasks(cfg, encoders, topo.rank, topo.world_size)


def _long_retrieval(step_fn: Stage2Step, cfg: Config, topo: Topology) -> dict:
    """R@1/5/10 with one caption per image (data.eval_caption_field): every rank encodes its share, features are
    gathered and re-ordered by index."""
    loader = build_eval_loader(
        cfg.data, cfg.model.llm.tokenizer or None, cfg.model.vision.image_size, cfg.eval.batch_size, topo.rank,
        topo.world_size, cfg.eval.max_samples, cfg.data.max_text_len, cfg.data.eval_caption_field,
        embedding_dim=cfg.model.adapter.input_dim, caption_format=cfg.model.llm.caption_format,
    )
    images, texts, indices = [], [], []
    for batch in loader:
        features = step_fn.features(batch)
        images.append(features.image)
        texts.append(features.text)
        indices.append(batch["index"].to(topo.device))
    all_images, all_texts = gather_in_sample_order(torch.cat(indices), torch.cat(images), torch.cat(texts))
    return retrieval_recall(all_images.cpu(), all_texts.cpu(), ks=(1, 5, 10))


class Stage2Task(EngineTask):
    """Stage 2 for the one loop (train/loop.py): vision tower + adapter + logit scale under DeepSpeed."""

    name = "stage2"

    def build(self, cfg: Config, topo: Topology) -> None:
        if needs_llm(cfg):
            _check_tokenizer_fits(cfg)
        self.cfg, self.topo = cfg, topo
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        text_tower = build_text_tower(cfg.model.llm, params_dtype=dtype).to(topo.device) if needs_llm(cfg) else None
        # Trainable LoRA on the frozen tower (online only; validation says so). The tower stays in eval mode: the
        # union of the group's captions is embedded once, so no per-rank dropout masks (lora_dropout is not used).
        self.lora = None
        if cfg.model.llm.lora_rank > 0:
            self.lora = LoRATrainer(text_tower, cfg, lr=cfg.optim.llm_lora_lr)
        # Built on the GPU in the training dtype (a bf16 copy is all DeepSpeed keeps of the module, and its fp32
        # master is made from it), so no rank holds an fp32 ViT-E on the host.
        model = build_clip_model(cfg.model, device=topo.device, dtype=dtype)
        # The teacher starts from the pretrained image encoder, before DeepSpeed shards anything.
        self.teacher = None
        if cfg.train.self_distill_weight > 0:
            self.teacher = EMATeacher(model.vision, cfg.train.ema_momentum, topo.device)
        self.engine = build_engine(model, cfg, topo.world_size, topo.device)
        loss_fn = build_contrastive_loss(cfg.train.loss, cfg.train.loss_tile_size)
        self.step_fn = Stage2Step(self.engine, text_tower, topo, dtype, loss_fn, self.teacher,
                                  cfg.train.self_distill_weight, self.lora, cfg.train.self_distill_reduction)
        self.eval_tasks = eval_tasks(self.step_fn, cfg, topo)  # reads nothing until the first evaluation
        self.loader = build_train_loader(
            cfg.data, cfg.model.llm.tokenizer or None, cfg.model.vision.image_size, cfg.train.micro_batch, topo.rank,
            topo.world_size, cfg.train.seed, cfg.data.max_text_len, embedding_dim=cfg.model.adapter.input_dim,
            caption_format=cfg.model.llm.caption_format,
        )

    def step(self, micro_batches: list[dict]) -> StepOutput:
        llm_lr = self.lora.lr if self.lora is not None else None  # before this step's schedule update
        # Device scalars, not floats: the loop reads loss and metrics together after its one all-reduce, so the step
        # itself waits for the device nowhere (tests/test_step_syncs.py counts).
        loss = torch.stack([self.step_fn(batch) for batch in micro_batches]).double().mean()
        grad_norm = self.engine.get_global_grad_norm()  # a device scalar under ZeRO and bf16, None before any step
        metrics = {
            "lr": max(self.engine.get_lr()),  # the base lr; layer-wise decay scales the trunk's groups below it
            "logit_scale": self.engine.module.scale().detach(),
            "grad_norm": 0.0 if grad_norm is None else grad_norm,
        }
        if self.lora is not None:
            metrics.update(llm_lora_lr=llm_lr, llm_lora_grad_norm=self.step_fn.lora_grad_norm)
        return StepOutput(loss=loss, applied=self.engine.was_step_applied(), metrics=metrics)

    def evaluate(self) -> dict | None:
        return evaluate(self.step_fn, self.cfg, self.topo, self.eval_tasks)

    def state(self) -> TaskState:
        shared = {}
        if self.teacher is not None:
            shared[EMA_FILE] = self.teacher.teacher.state_dict()
        llm_state = None
        if self.lora is not None:
            llm_state, lora_files = self.lora.checkpoint_parts()
            shared.update(lora_files)
        return TaskState(engine=self.engine, llm=llm_state, shared=shared, rank=self.loader_state())

    def load_state(self, shared: dict, rank: dict | None) -> None:
        if self.teacher is not None:
            self.teacher.teacher.load_state_dict(shared[EMA_FILE])
        self.load_loader_state(rank)


def train_stage2(cfg: Config) -> dict:
    """Train stage 2 from ``cfg``; returns the final metrics (on every rank)."""
    return run(cfg, Stage2Task())
