"""ProCLIP stage 1, representation inheritance: distil a frozen CLIP text encoder into the LLM adapter.

The path of one batch, top to bottom:
  loader (this rank's b samples: LLM token ids + raw captions) -> TP group embeds its ranks' captions once (frozen
  LLM, or sidecar embeddings offline) -> DeepSpeed engine holding only the adapter -> student s = adapter(t')
  teacher t = E_T(captions) (frozen HF CLIP text encoder, its own tokenizer, on every rank)
  loss = instance_weight * L_ins(s, t) + structure_weight * L_struct(s, t) -> engine.backward/step
At the end rank 0 writes ``<checkpoint.dir>/adapter.safetensors``, which ProCLIP stage 2 loads through
``model.adapter_init``; the held-out split measures how well the adapter reproduces the teacher.

Why a DeepSpeed engine for a small MLP: it gives the same data-parallel gradient averaging, clipping, bf16 handling
and lr schedule as stage 2 (train/engine.py) with no second optimizer code path. The losses are per rank (pairwise
structure within the local batch, see losses/proclip.py); DeepSpeed averages the gradients over the world.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from llm2clip_scale.checkpoint.manager import TaskState
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.loader import build_eval_loader, build_train_loader
from llm2clip_scale.distributed.collectives import gather_in_sample_order
from llm2clip_scale.distributed.topology import Topology
from llm2clip_scale.losses.proclip import instance_loss, structure_loss
from llm2clip_scale.models.adapter import LLMAdapter
from llm2clip_scale.models.clip_text import CLIPTextTeacher, load_clip_text_teacher
from llm2clip_scale.models.llm.tower import build_text_tower
from llm2clip_scale.models.warm_start import save_adapter
from llm2clip_scale.train.engine import build_engine
from llm2clip_scale.train.loop import run
from llm2clip_scale.train.stage2 import caption_embeddings, needs_llm
from llm2clip_scale.train.task import EngineTask, StepOutput

log = logging.getLogger("llm2clip_scale.train")

ADAPTER_FILE = "adapter.safetensors"
RUN_NAME = "proclip_inherit"


class AdapterStudent(nn.Module):
    """The trainable side of stage 1: just the adapter, under the same attribute name as in CLIPWithAdapter."""

    def __init__(self, adapter: LLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.adapter(llm_embeddings)


class InheritStep:
    """One micro-batch: LLM embeddings -> adapter (student) vs the CLIP text teacher on the same captions."""

    def __init__(self, engine, text_tower: nn.Module | None, teacher: CLIPTextTeacher, topo: Topology,
                 dtype: torch.dtype, cfg: Config) -> None:
        self.engine = engine
        self.text_tower = text_tower
        self.teacher = teacher
        self.topo = topo
        self.dtype = dtype
        self.instance_weight = cfg.proclip.instance_weight
        self.structure_weight = cfg.proclip.structure_weight
        self.max_text_len = cfg.data.max_text_len
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def llm_embeddings(self, batch: dict) -> torch.Tensor:
        return caption_embeddings(batch, self.text_tower, self.tp_group, self.topo.device)

    def embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) float32; the teacher's rows are unit norm, the student's are raw adapter outputs."""
        student = self.engine(self.llm_embeddings(batch).to(self.dtype)).float()
        teacher = self.teacher.encode(batch["captions"], self.topo.device, self.max_text_len)
        return student, teacher

    def losses(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ins = instance_loss(student, teacher)
        struct = structure_loss(student, teacher)
        return self.instance_weight * ins + self.structure_weight * struct, ins, struct

    def __call__(self, batch: dict) -> tuple[float, float, float]:
        loss, ins, struct = self.losses(*self.embeddings(batch))
        self.engine.backward(loss)  # a non-finite loss poisons the gradients, and DeepSpeed then skips the update
        self.engine.step()
        return loss.item(), ins.item(), struct.item()


def agreement_metrics(student: torch.Tensor, teacher: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """How well normalised student rows reproduce their teacher rows (row i of both = caption i).

    cos_agreement: mean cosine of the pairs; cos_unpaired: mean cosine of a student to the other captions' teacher
    rows (the level a caption-agnostic adapter would reach); r{k}_s2t: text->text retrieval, each student row queries
    all teacher rows, a hit when fewer than k teacher rows score strictly higher than its own (ties with duplicate
    captions, whose teacher rows are identical, count as hits, as in eval/retrieval.py).
    """
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    n = s.shape[0]
    sim = s @ t.T
    own = sim.diagonal()
    rank = (sim > own.unsqueeze(1)).sum(dim=1)
    metrics = {
        "cos_agreement": own.mean().item(),
        "cos_unpaired": ((sim.sum() - own.sum()) / max(1, n * (n - 1))).item(),
        "eval_l_ins": instance_loss(s, t).item(),
        "eval_l_struct": structure_loss(s, t).item() if n > 1 else 0.0,
    }
    for k in ks:
        metrics[f"r{k}_s2t"] = (rank < k).float().mean().item()
    metrics["chance"] = 1.0 / n
    metrics["num_samples"] = n
    return metrics


@torch.no_grad()
def evaluate(step_fn: InheritStep, cfg: Config, topo: Topology) -> dict:
    """Agreement on the held-out split: ranks embed their share, rows are gathered and re-ordered by index."""
    step_fn.engine.eval()
    loader = build_eval_loader(
        cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, cfg.eval.batch_size, topo.rank,
        topo.world_size, cfg.eval.max_samples, cfg.data.max_text_len, cfg.data.eval_caption_field,
        caption_format=cfg.model.llm.caption_format,
    )
    students, teachers, indices = [], [], []
    for batch in loader:
        student, teacher = step_fn.embeddings(batch)
        students.append(student)
        teachers.append(teacher)
        indices.append(batch["index"].to(topo.device))
    step_fn.engine.train()
    all_students, all_teachers = gather_in_sample_order(torch.cat(indices), torch.cat(students), torch.cat(teachers))
    return agreement_metrics(all_students.cpu(), all_teachers.cpu())


class ProCLIPInheritTask(EngineTask):
    """ProCLIP stage 1 for the one loop (train/loop.py): the adapter alone under DeepSpeed, against the teacher."""

    name = RUN_NAME

    def build(self, cfg: Config, topo: Topology) -> None:
        self.cfg, self.topo = cfg, topo
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        teacher = load_clip_text_teacher(cfg.proclip.teacher_text, topo.device)
        if teacher.embed_dim != cfg.model.embed_dim:
            raise ValueError(
                f"model.embed_dim: {cfg.model.embed_dim} != the CLIP text teacher's projection_dim "
                f"{teacher.embed_dim} ({cfg.proclip.teacher_text}); the adapter must output its size"
            )
        # Built whenever training or evaluation embeds captions online (offline training may still evaluate online).
        text_tower = build_text_tower(cfg.model.llm, params_dtype=dtype).to(topo.device) if needs_llm(cfg) else None
        student = AdapterStudent(LLMAdapter(cfg.model.adapter, cfg.model.embed_dim))
        self.engine = build_engine(student, cfg, topo.world_size, topo.device)
        self.step_fn = InheritStep(self.engine, text_tower, teacher, topo, dtype, cfg)
        self.loader = build_train_loader(
            cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, cfg.train.micro_batch, topo.rank,
            topo.world_size, cfg.train.seed, cfg.data.max_text_len, caption_format=cfg.model.llm.caption_format,
        )

    def step(self, micro_batches: list[dict]) -> StepOutput:
        totals = torch.zeros(3, dtype=torch.float64)
        for batch in micro_batches:
            totals += torch.tensor(self.step_fn(batch), dtype=torch.float64) / len(micro_batches)
        loss, l_ins, l_struct = totals.tolist()
        return StepOutput(loss=loss, applied=self.engine.was_step_applied(), terms={"l_ins": l_ins,
                                                                                  "l_struct": l_struct},
                          metrics={"lr": self.engine.get_lr()[0],
                                   "grad_norm": float(self.engine.get_global_grad_norm() or 0.0)})

    def evaluate(self) -> dict | None:
        return evaluate(self.step_fn, self.cfg, self.topo) if self.cfg.data.eval_shards else None

    def state(self) -> TaskState:
        return TaskState(engine=self.engine, rank=self.loader_state())

    def load_state(self, shared: dict, rank: dict | None) -> None:
        self.load_loader_state(rank)

    def finish(self) -> dict:
        """Write ``<checkpoint.dir>/adapter.safetensors``, which ProCLIP stage 2 loads through model.adapter_init."""
        cfg = self.cfg
        adapter_path = Path(cfg.checkpoint.dir) / ADAPTER_FILE
        if self.topo.is_main:
            # ZeRO 0-2 keep the full adapter on every rank (validate() refuses ZeRO-3), so rank 0's copy is the model.
            adapter_path.parent.mkdir(parents=True, exist_ok=True)
            adapter_cfg = cfg.model.adapter
            save_adapter(self.engine.module.adapter, adapter_path, meta={
                "input_dim": adapter_cfg.input_dim, "num_blocks": adapter_cfg.num_blocks,
                "expansion": adapter_cfg.expansion, "embed_dim": cfg.model.embed_dim,
                "teacher_text": cfg.proclip.teacher_text, "steps": cfg.train.steps,
            })
        dist.barrier()  # the file exists for every rank (and a following stage 2) once this returns
        return {"adapter": str(adapter_path)}


def train_proclip_inherit(cfg: Config) -> dict:
    """Train the adapter against the frozen CLIP text teacher; returns the final metrics (on every rank)."""
    return run(cfg, ProCLIPInheritTask())
