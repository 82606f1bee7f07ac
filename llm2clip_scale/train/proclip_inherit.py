"""ProCLIP stage 1, representation inheritance: distil a frozen CLIP text encoder into the LLM adapter.

The path of one batch, top to bottom:
  loader (this rank's b samples: LLM token ids + raw captions) -> TP group embeds its ranks' captions once (frozen
  LLM, or sidecar embeddings offline) -> DeepSpeed engine holding only the adapter -> student s = adapter(t')
  teacher t = E_T(captions) (frozen HF CLIP text encoder, its own tokenizer, on every rank), on the captions it
  reads whole only: a longer one is dropped from the loss and counted in skipped_samples
  loss = instance_weight * L_ins(s, t) + structure_weight * L_struct(s, t) -> engine.backward/step
With proclip.views (the official recipe: short and raw captions), every sample is distilled on each view's caption:
one text-only loader per view (same seed and shards, so the same samples in the same order), one LLM embed and one
adapter forward over all views' rows, the per-view terms reduced by proclip.reduction (losses/proclip.py:
multi_view_losses).
At the end rank 0 writes ``<checkpoint.dir>/adapter.safetensors``, which ProCLIP stage 2 loads through
``model.adapter_init``; the held-out split measures how well the adapter reproduces the teacher.

Why a DeepSpeed engine for a small MLP: it gives the same data-parallel gradient averaging, clipping, bf16 handling
and lr schedule as stage 2 (train/engine.py) with no second optimizer code path. The losses are per rank (pairwise
structure within the local batch, see losses/proclip.py); DeepSpeed averages the gradients over the world.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from llm2clip_scale.checkpoint.manager import TaskState
from llm2clip_scale.config.schema import Config, DataConfig, ProCLIPConfig
from llm2clip_scale.data.loader import build_eval_loader, build_train_loader
from llm2clip_scale.distributed.collectives import gather_in_sample_order, sum_over_ranks
from llm2clip_scale.distributed.topology import Topology
from llm2clip_scale.losses.proclip import instance_loss, multi_view_losses, structure_loss
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


@dataclass
class Distilled:
    """One micro-batch's stage-1 loss and its parts; ``dropped``/``views`` count captions refused / offered as
    teacher views on this rank."""

    loss: torch.Tensor
    l_ins: torch.Tensor
    l_struct: torch.Tensor
    dropped: int
    views: int


class Distiller:
    """The teacher side of stage 1: keeps the captions the teacher reads whole, embeds them, and forms the loss.

    A caption longer than the teacher's context would be truncated by it while the LLM reads it whole, so the
    adapter would learn to ignore everything past the cut; such captions are no teacher views (dropped, counted).
    """

    def __init__(self, teacher: CLIPTextTeacher, proclip: ProCLIPConfig, max_text_len: int,
                 device: torch.device | str) -> None:
        self.teacher, self.device = teacher, device
        self.limit = min(teacher.max_length, max_text_len)  # what CLIPTextTeacher.encode reads of a caption
        self.instance_weight, self.structure_weight = proclip.instance_weight, proclip.structure_weight
        self.reduction = proclip.reduction
        self.structure_views = set(proclip.structure_views)

    def __call__(self, views: dict[str, tuple[torch.Tensor, list[str]]]) -> Distilled:
        """``views``: field -> (student rows, their captions); the field "" is the single drawn-caption view."""
        pairs, structure, dropped, offered = [], [], 0, 0
        for name, (student, captions) in views.items():
            # The full teacher tokenisation (special tokens included): its length decides, and the teacher embeds it.
            ids = self.teacher.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
            rows = [i for i, row in enumerate(ids) if len(row) <= self.limit]
            dropped, offered = dropped + len(captions) - len(rows), offered + len(captions)
            if len(rows) < len(captions):
                # Row numbers from the host, copied without waiting for the device (a boolean mask would make the
                # host wait to learn how many rows it keeps).
                student = student.index_select(0, torch.tensor(rows, dtype=torch.long).to(student.device,
                                                                                           non_blocking=True))
            teacher = (self.teacher.encode_ids([ids[i] for i in rows], self.device) if rows
                       else student.new_zeros(0, student.shape[1]))
            pairs.append((student, teacher))
            structure.append(not self.structure_views or name in self.structure_views)
        ins, struct = multi_view_losses(pairs, structure, self.reduction)
        loss = self.instance_weight * ins + self.structure_weight * struct
        return Distilled(loss, ins, struct, dropped, offered)


class InheritStep:
    """One micro-batch: LLM embeddings -> adapter (student) vs the CLIP text teacher on the same captions.

    A batch is the loader's batch (one view: the drawn caption) or a tuple of the proclip.views loaders' batches, in
    that order (a tuple, so the loop's FLOP count sees every view's captions), whose views' LLM embeddings go
    through the adapter in one forward.
    """

    def __init__(self, engine, text_tower: nn.Module | None, teacher: CLIPTextTeacher, topo: Topology,
                 dtype: torch.dtype, cfg: Config) -> None:
        self.engine = engine
        self.text_tower = text_tower
        self.teacher = teacher
        self.topo = topo
        self.dtype = dtype
        self.max_text_len = cfg.data.max_text_len
        self.distiller = Distiller(teacher, cfg.proclip, cfg.data.max_text_len, topo.device)
        self.view_names = list(cfg.proclip.views)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()

    def llm_embeddings(self, batch: dict) -> torch.Tensor:
        return caption_embeddings(batch, self.text_tower, self.tp_group, self.topo.device)

    def embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) float32 of a one-view batch, every caption (evaluation: the teacher truncates as it
        must); the teacher's rows are unit norm, the student's are raw adapter outputs."""
        student = self.engine(self.llm_embeddings(batch).to(self.dtype)).float()
        teacher = self.teacher.encode(batch["captions"], self.topo.device, self.max_text_len)
        return student, teacher

    def views_embeddings(self, views: list[dict]) -> torch.Tensor:
        """All views' LLM embeddings, in view order, from one embed of every view's captions (online): the TP group's
        exchanges and tower passes come once per micro-batch, not once per view. Same calls on every TP rank."""
        if len(views) == 1 or "llm_embeddings" in views[0]:
            return torch.cat([self.llm_embeddings(view) for view in views])
        width = max(view["input_ids"].shape[1] for view in views)
        # Right padding is masked, so widening a view's rows to the longest view's changes none of its embeddings.
        merged = {key: torch.cat([F.pad(view[key], (0, width - view[key].shape[1])) for view in views])
                  for key in ("input_ids", "attention_mask", "pool_mask")}
        return self.llm_embeddings(merged)

    def distil(self, batch: dict | tuple[dict, ...]) -> Distilled:
        views = dict(zip(self.view_names, batch, strict=True)) if isinstance(batch, tuple) else {"": batch}
        llm = self.views_embeddings(list(views.values()))
        students = self.engine(llm.to(self.dtype)).float().split([len(view["captions"]) for view in views.values()])
        return self.distiller({name: (student, view["captions"])
                               for (name, view), student in zip(views.items(), students)})

    def __call__(self, batch: dict | tuple[dict, ...]) -> Distilled:
        out = self.distil(batch)
        self.engine.backward(out.loss)  # a non-finite loss poisons the gradients, and DeepSpeed then skips the update
        self.engine.step()
        return out


def agreement_metrics(student: torch.Tensor, teacher: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """How well normalised student rows reproduce their teacher rows (row i of both = caption i).

    cos_agreement: mean cosine of the pairs; cos_unpaired: mean cosine of a student to the other captions' teacher
    rows (the level a caption-agnostic adapter would reach); r{k}_s2t: text->text retrieval, each student row queries
    all teacher rows, a hit when fewer than k teacher rows score strictly higher than its own (ties count as hits,
    unlike eval/ranking.py: the ties here are duplicate captions, whose identical teacher rows are right answers).
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


def view_data(data: DataConfig, field_name: str) -> DataConfig:
    """``data`` with every training dataset drawing only ``field_name``: the stream of one view."""
    only = {field_name: 1.0}
    return replace(data, caption_fields=only,
                   train_datasets=[replace(source, caption_fields=only) for source in data.train_datasets])


def zip_views(streams: dict[str, Iterator[dict]]) -> Iterator[tuple[dict, ...]]:
    """Batches of the views' loaders side by side, one tuple per micro-batch in the streams' order.

    The loaders share seed, shards and draw order (only the caption field differs), so they yield the same samples
    in the same order as long as every sample carries every field; a sample lacking one shifts one stream, and the
    key check stops the run rather than distil one image's caption against another's.
    """
    while True:
        views = {name: next(stream) for name, stream in streams.items()}
        keys = [view["keys"] for view in views.values()]
        if any(k != keys[0] for k in keys[1:]):
            first = next(i for i, pair in enumerate(zip(*keys)) if len(set(pair)) > 1)
            raise ValueError(
                f"proclip.views {list(views)}: the views' streams disagree at sample {keys[0][first]!r} vs "
                f"{[k[first] for k in keys[1:]]}; every training sample must carry every view field (check "
                "the loaders' missing_caption skips), or use one view (proclip.views: [])"
            )
        yield tuple(views.values())


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
        self.teacher_dropped = 0  # captions this rank refused as teacher views so far (rank state: survives resume)
        datas = {name: view_data(cfg.data, name) for name in cfg.proclip.views} or {"": cfg.data}
        self.loaders = {
            name: build_train_loader(
                data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, cfg.train.micro_batch, topo.rank,
                topo.world_size, cfg.train.seed, cfg.data.max_text_len, caption_format=cfg.model.llm.caption_format,
                images=False,  # stage 1 distils text into text: no image is decoded
            )
            for name, data in datas.items()
        }
        self.loader = next(iter(self.loaders.values()))  # its skip counts are the run's (every view skips alike)

    def batches(self) -> Iterator[list[dict]]:
        if not self.cfg.proclip.views:
            yield from super().batches()
            return
        accumulation = self.engine.gradient_accumulation_steps()
        stream = zip_views({name: iter(loader) for name, loader in self.loaders.items()})
        while True:
            yield [next(stream) for _ in range(accumulation)]

    def step(self, micro_batches: list[dict]) -> StepOutput:
        # Device scalars, not floats: the loop reads them all in one transfer after its all-reduce, so the step waits
        # for the device nowhere (tests/test_step_syncs.py counts).
        losses, dropped_frac = [], 0.0
        for batch in micro_batches:
            out = self.step_fn(batch)
            self.teacher_dropped += out.dropped
            dropped_frac += out.dropped / out.views / len(micro_batches)
            losses.append(torch.stack([out.loss.detach(), out.l_ins.detach(), out.l_struct.detach()]))
        loss, l_ins, l_struct = torch.stack(losses).double().mean(dim=0).unbind()
        grad_norm = self.engine.get_global_grad_norm()  # a device scalar under ZeRO and bf16, None before any step
        return StepOutput(loss=loss, applied=self.engine.was_step_applied(),
                          terms={"l_ins": l_ins, "l_struct": l_struct, "teacher_dropped_frac": dropped_frac},
                          metrics={"lr": self.engine.get_lr()[0], "grad_norm": 0.0 if grad_norm is None else grad_norm})

    def skipped_samples(self) -> int:
        """The loader's skips plus the captions refused as teacher views (too long for the teacher), world-wide."""
        return sum_over_ranks(sum(self.loader.skipped().values()) + self.teacher_dropped, self.topo.device)

    def evaluate(self) -> dict | None:
        return evaluate(self.step_fn, self.cfg, self.topo) if self.cfg.data.eval_shards else None

    def state(self) -> TaskState:
        return TaskState(engine=self.engine, rank={
            "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()},
            "teacher_dropped": self.teacher_dropped,
        })

    def load_state(self, shared: dict, rank: dict | None) -> None:
        if rank is None:
            for loader in self.loaders.values():
                loader.start_fresh_pass()
            return
        # Checkpoints from before proclip.views hold one loader under "loader": the single-view stream.
        saved = rank["loaders"] if "loaders" in rank else {"": rank["loader"]}
        if set(saved) != set(self.loaders):
            raise ValueError(f"proclip.views: the checkpoint's views {sorted(saved)} differ from this run's "
                             f"{sorted(self.loaders)}; resume with the same views")
        for name, loader in self.loaders.items():
            loader.load_state_dict(saved[name])
        self.teacher_dropped = rank.get("teacher_dropped", 0)

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
