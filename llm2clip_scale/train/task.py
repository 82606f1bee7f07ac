"""What a training stage hands the one loop (train/loop.py): a small task object, after open_clip's TrainingTask.

The loop owns everything stages share — set-up, the step loop, metric reduction, the non-finite policy, logging,
periodic eval, checkpoint timing, resume, the stop flag and result.json. A task owns only its models, its batches,
one optimizer step, its evaluation and the state that makes it resumable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llm2clip_scale.checkpoint.manager import TaskState
from llm2clip_scale.config.schema import Config
from llm2clip_scale.distributed.collectives import sum_over_ranks
from llm2clip_scale.distributed.topology import Topology


@dataclass
class StepOutput:
    """One optimizer step as the task saw it on this rank.

    ``loss`` and ``terms`` are this rank's local values; the loop averages them over the world (equal local batches,
    so the mean is the global-batch value; model-parallel ranks of one replica report the same value). ``metrics``
    are already global (lr, grad norm, logit scale). ``applied`` is False when the optimizer step was not taken
    because a loss or gradient was not finite; the task guarantees weights, optimizer and schedule are then untouched.
    Values may be floats or device scalars: the loop reads all of them in one transfer after its all-reduce, so a
    task that hands over device scalars never waits for the device itself.
    """

    loss: float | torch.Tensor
    applied: bool
    terms: dict[str, float | torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class TrainingTask(Protocol):
    name: str  # run name: TensorBoard and progress-bar label, recorded in the checkpoint

    def build(self, cfg: Config, topo: Topology) -> None:
        """Build models, optimizer and data streams (after process groups exist)."""

    def before_training(self) -> dict:
        """Work done once on a fresh start (not on resume), e.g. CRA of the untuned tower; its result entries."""

    def batches(self) -> Iterator[Any]:
        """The resumable stream of optimizer-step batches."""

    def step(self, batch: Any) -> StepOutput:
        """Forward, backward and optimizer step (skipped when not finite) on one step's batch."""

    def evaluate(self) -> dict[str, float] | None:
        """Held-out metrics (collective; every rank returns the same dict), or None when the config has no split."""

    def skipped_samples(self) -> int:
        """Samples skipped as unusable so far, over the whole world (collective)."""

    def data_key(self) -> tuple:
        """This rank's data-parallel coordinates: a saved rank state is restored only where they match."""

    def state(self) -> TaskState:
        """What to checkpoint now."""

    def load_state(self, shared: dict, rank: dict | None) -> None:
        """Restore the shared tensors and this rank's state (None: the layout changed, streams start afresh)."""

    def finish(self) -> dict:
        """Final artifacts (adapter or LoRA files, collective) and result entries."""


class EngineTask:
    """What the DeepSpeed stages share (stage 2, ProCLIP inheritance): one engine fed by this rank's TrainLoader,
    one list of micro-batches per optimizer step, data coordinates (rank, world), the loader position as rank state.
    Subclasses set ``engine``, ``loader`` and ``topo`` in ``build`` and write ``step``, ``evaluate`` and ``state``.
    """

    engine: Any
    loader: Any  # llm2clip_scale.data.loader.TrainLoader
    topo: Topology

    def before_training(self) -> dict:
        return {}

    def batches(self) -> Iterator[list[dict]]:
        accumulation = self.engine.gradient_accumulation_steps()
        stream = iter(self.loader)
        while True:
            yield [next(stream) for _ in range(accumulation)]

    def skipped_samples(self) -> int:
        return sum_over_ranks(sum(self.loader.skipped().values()), self.topo.device)

    def data_key(self) -> tuple:
        return ("rank", self.topo.rank, self.topo.world_size)

    def loader_state(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_loader_state(self, rank: dict | None) -> None:
        if rank is None:
            self.loader.start_fresh_pass()
        else:
            self.loader.load_state_dict(rank["loader"])

    def finish(self) -> dict:
        return {}
