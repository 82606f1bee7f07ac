"""LoRA checkpoints of the LLM tower: one TP/PP-independent safetensors file per step, written atomically.

``<root>/step<N>/lora.safetensors`` + ``adapter_config.json``; ``<root>/latest`` names the newest step. A checkpoint
written at one TP x PP layout loads at any other (keys use global layer indices and full, unsharded matrices).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import save_file
from torch import Tensor

from llm2clip_scale.config.schema import Config
from llm2clip_scale.models.llm.lora import gather_lora_state, load_lora_state
from llm2clip_scale.models.llm.tower import LLMTextEncoder

LORA_FILE = "lora.safetensors"
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_lora_state(tower: LLMTextEncoder) -> dict[str, Tensor]:
    """The whole model's LoRA matrices, TP- and PP-independent, on every rank. Collective over the world.

    ``gather_lora_state`` reassembles TP shards but names adapters by the module path, whose layer index is local to
    the pipeline stage (stage 1 of PP=2 calls global layer 3 ``decoder.layers.0``); keys are renamed to the global
    layer index and the stages' dicts are merged, so a PP=2 checkpoint is a PP=1 checkpoint.
    """
    local = gather_lora_state(tower)
    state = {_to_global(tower, key): value for key, value in local.items()}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        parts: list[dict[str, Tensor] | None] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, state, group=parallel_state.get_pipeline_model_parallel_group())
        state = {key: value for part in parts if part for key, value in part.items()}
    return state


def load_global_lora_state(tower: LLMTextEncoder, state: dict[str, Tensor]) -> None:
    """Copy a :func:`global_lora_state` dict (any TP/PP layout) into this rank's adapters."""
    local_of = {layer.layer_number - 1: index for index, layer in enumerate(tower.decoder.layers)}
    mine: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise KeyError(f"LoRA state key {key} names no decoder layer")
        index = local_of.get(int(match.group(1)))
        if index is not None:  # other layers live on other pipeline stages
            mine[f"decoder.layers.{index}.{key[match.end():]}"] = value
    load_lora_state(tower, mine)


def _to_global(tower: LLMTextEncoder, key: str) -> str:
    match = _LAYER_KEY.match(key)
    if match is None:
        raise KeyError(f"LoRA adapter {key} is not inside a decoder layer")
    layer = tower.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{key[match.end():]}"


def save_lora_checkpoint(tower: LLMTextEncoder, cfg: Config, step: int, directory: str | Path) -> Path:
    """Write ``<directory>/step<step>/lora.safetensors`` (+ ``adapter_config.json``) and point ``latest`` at it.

    Collective (the state is gathered over TP and PP); rank 0 writes. The step directory is assembled under a
    temporary name and renamed when complete, and ``latest`` is replaced last, so a crash never leaves a pointer
    to a half-written checkpoint.
    """
    state = global_lora_state(tower)
    root = Path(directory)
    final = root / f"step{step}"
    if dist.get_rank() == 0:
        llm = cfg.model.llm
        tmp = root / f".step{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / LORA_FILE), metadata={"step": str(step)})
        meta = {
            "step": step, "lora_rank": llm.lora_rank, "lora_alpha": llm.lora_alpha, "lora_dropout": llm.lora_dropout,
            "lora_targets": list(llm.lora_targets), "base_checkpoint": llm.hf_checkpoint, "base_seed": llm.seed,
            "bidirectional": llm.bidirectional, "instruction": llm.instruction,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(f"step{step}\n")
        os.replace(pointer, root / "latest")
    dist.barrier()
    return final / LORA_FILE


def resolve_lora_path(path: str | Path) -> Path:
    """A LoRA file from a file path, a step directory, or a checkpoint root holding ``latest``."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip() / LORA_FILE
    raise FileNotFoundError(f"{path}: no {LORA_FILE}, step directory or checkpoint root with 'latest'")
