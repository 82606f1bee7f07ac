"""The paper-protocol eval tasks over the stage-2 towers (docs/EVAL.md): multi-caption retrieval, zero-shot
classification and CRA. (long_retrieval, the single-caption task, runs through the stage-2 eval loader instead.)

Each task reads its set with :func:`llm2clip_scale.data.eval_sets.read_eval_set`, encodes it split over the ranks,
gathers the features in set order on every rank and scores them with the pure metric functions. Metrics are named
``<task>/<metric>``; every rank returns the same dict.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.eval_sets import EvalSet, read_eval_set
from llm2clip_scale.data.samples import ImageTransform
from llm2clip_scale.distributed.collectives import gather_in_sample_order
from llm2clip_scale.eval.cra import caption_retrieval_accuracy
from llm2clip_scale.eval.encoders import Encoders
from llm2clip_scale.eval.multi_caption import multi_caption_recall
from llm2clip_scale.eval.retrieval import retrieval_recall
from llm2clip_scale.eval.task_config import LLM_TASKS, task_source, zeroshot_classes_path
from llm2clip_scale.eval.zeroshot import class_prompts, zeroshot_accuracy, zeroshot_classifier


def load_zeroshot_classes(path: Path) -> tuple[list[str], list[str]]:
    """(class names, templates) of a zero-shot json file; ValueError naming the problem otherwise."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"eval.zeroshot_classes: cannot read {path}: {err}") from None
    spec = spec if isinstance(spec, dict) else {}
    classes, templates = spec.get("classes"), spec.get("templates")
    lists = isinstance(classes, list) and isinstance(templates, list)
    if not lists or not all(isinstance(x, str) for x in classes + templates):
        raise ValueError(f"eval.zeroshot_classes: {path} must hold {{'classes': [str], 'templates': [str]}}")
    class_prompts(classes, templates)  # checks the slots and distinct names
    return classes, templates


def captions_of(meta: dict, field: str) -> list[str]:
    """An image's captions: a json list of strings, or one string; blanks dropped."""
    value = meta.get(field)
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _label_of(meta: dict, field: str) -> int | None:
    value = meta.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def encode_split(count: int, encode: Callable[[list[int]], torch.Tensor], batch_size: int, rank: int,
                 world_size: int) -> torch.Tensor:
    """Rows 0..count-1 of ``encode`` computed over the ranks (rank r: rows r, r+W, ...), in row order on every rank.

    Every rank encodes the same number of rows, padded with index -1 (``encode`` gives such rows a placeholder
    input) and dropped after the gather: the towers' collectives need every rank in every call.
    """
    per_rank = math.ceil(count / world_size)
    own = list(range(rank, count, world_size))
    own += [-1] * (per_rank - len(own))
    rows = torch.cat([encode(own[start : start + batch_size]) for start in range(0, per_rank, batch_size)])
    index = torch.tensor(own, dtype=torch.long, device=rows.device)
    if world_size > 1:
        if not dist.is_initialized() or dist.get_world_size() != world_size:
            raise ValueError(f"encode_split: world_size {world_size} needs an initialised process group of that size")
        index, rows = gather_in_sample_order(index, index, rows, equal_rows=True)
    return rows[index >= 0]  # one rank: its rows are 0..count-1 in order, none padded


class EvalTasks:
    """The eval tasks of one model (its ``encoders``): each task's set is read, and its images checked, on first use
    only, so periodic evaluation during training re-reads nothing (a rank keeps its share of the image bytes)."""

    def __init__(self, cfg: Config, encoders: Encoders, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.encoders, self.rank, self.world = cfg, encoders, rank, world_size
        data = cfg.data
        self.transform = ImageTransform(cfg.model.vision.image_size, data.image_mean, data.image_std, "none", None)
        self.batch = cfg.eval.batch_size
        self._sets: dict[str, EvalSet] = {}

    @torch.no_grad()
    def run(self, tasks: list[str]) -> dict[str, float]:
        """Metrics of each of ``tasks`` that has data: long_retrieval's unprefixed (as in stage 2), the LLM tasks'
        ``<task>/<metric>``. Collective; every rank returns the same dict."""
        metrics: dict[str, float] = {}
        for task in tasks:
            if task != "long_retrieval" and task not in LLM_TASKS:
                raise ValueError(f"eval.tasks: {task!r} is not one of long_retrieval, {', '.join(LLM_TASKS)}")
            if task_source(self.cfg, task) is None:
                continue
            found = getattr(self, task)()
            metrics.update(found if task == "long_retrieval" else {f"{task}/{k}": v for k, v in found.items()})
        return metrics

    def read(self, task: str, accept: Callable[[dict], bool], images: bool = True) -> EvalSet:
        if task not in self._sets:
            evalset = read_eval_set(task_source(self.cfg, task), accept, self.rank, self.world,
                                    self.cfg.eval.max_samples, what=f"eval {task} data", images=images)
            if images:
                self._check_images(evalset)
            self._sets[task] = evalset
        return self._sets[task]

    def _check_images(self, evalset: EvalSet) -> None:
        # Decoded once up front and agreed on: a rank that failed mid-way would leave the others in a collective.
        bad = []
        for index, data in evalset.images.items():
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt bytes
                bad.append(f"{evalset.keys[index]} ({err})")
        if self.world > 1:
            every: list = [None] * self.world
            dist.all_gather_object(every, bad)
            bad = [item for rank_bad in every for item in rank_bad]
        if bad:
            raise ValueError(f"eval images that do not decode: {', '.join(bad[:5])} ({len(bad)} in all)")

    def image_features(self, evalset: EvalSet) -> torch.Tensor:
        size = self.cfg.model.vision.image_size

        def encode(indices: list[int]) -> torch.Tensor:
            pixels = []
            for i in indices:
                if i < 0:
                    pixels.append(torch.zeros(3, size, size))
                    continue
                with Image.open(io.BytesIO(evalset.images[i])) as image:
                    pixels.append(self.transform(image.convert("RGB")))
            return self.encoders.images(torch.stack(pixels))

        return encode_split(len(evalset), encode, self.batch, self.rank, self.world)

    def text_features(self, captions: list[str], llm_only: bool = False) -> torch.Tensor:
        embed = self.encoders.llm if llm_only else self.encoders.texts
        return encode_split(len(captions), lambda idx: embed([captions[max(i, 0)] for i in idx]), self.batch,
                            self.rank, self.world)

    def long_retrieval(self) -> dict[str, float]:
        """The single-caption task read like the others (for models outside the stage-2 loader: an export)."""
        field = self.cfg.data.eval_caption_field
        evalset = self.read("long_retrieval", lambda meta: len(captions_of(meta, field)) == 1)
        captions = [captions_of(meta, field)[0] for meta in evalset.metas]
        return retrieval_recall(self.image_features(evalset).cpu(), self.text_features(captions).cpu(), ks=(1, 5, 10))

    def retrieval(self) -> dict[str, float]:
        field = self.cfg.eval.captions_field
        evalset = self.read("retrieval", lambda meta: bool(captions_of(meta, field)))
        captions, owner = [], []
        for index, meta in enumerate(evalset.metas):
            found = captions_of(meta, field)
            captions += found
            owner += [index] * len(found)
        metrics = multi_caption_recall(self.image_features(evalset).cpu(), self.text_features(captions).cpu(),
                                       torch.tensor(owner))
        return {**metrics, "chance": 1.0 / len(evalset)}

    def zeroshot(self) -> dict[str, float]:
        classes, templates = load_zeroshot_classes(zeroshot_classes_path(self.cfg))
        field = self.cfg.eval.label_field
        evalset = self.read("zeroshot", lambda meta: _label_of(meta, field) is not None)
        labels = torch.tensor([_label_of(meta, field) for meta in evalset.metas])
        if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
            raise ValueError(f"eval zeroshot data: labels must lie in [0, {len(classes)}) (the classes listed)")
        prompts = self.text_features(class_prompts(classes, templates)).cpu()
        classifier = zeroshot_classifier(prompts.reshape(len(classes), len(templates), -1))
        return zeroshot_accuracy(self.image_features(evalset).cpu(), classifier, labels, ks=(1, 5))

    def cra(self) -> dict[str, float]:
        field = self.cfg.eval.captions_field
        evalset = self.read("cra", lambda meta: len(captions_of(meta, field)) >= 2, images=False)
        pairs = [captions_of(meta, field)[:2] for meta in evalset.metas]
        queries = self.text_features([p[0] for p in pairs], llm_only=True)
        keys = self.text_features([p[1] for p in pairs], llm_only=True)
        return {"top1": caption_retrieval_accuracy(queries.cpu(), keys.cpu()), "num_pairs": len(pairs),
                "chance": 1.0 / len(pairs)}


def run_tasks(tasks: list[str], cfg: Config, encoders: Encoders, rank: int = 0, world_size: int = 1) -> dict:
    """One evaluation of ``tasks`` (see :meth:`EvalTasks.run`); a run that evaluates again keeps an EvalTasks."""
    return EvalTasks(cfg, encoders, rank, world_size).run(tasks)
