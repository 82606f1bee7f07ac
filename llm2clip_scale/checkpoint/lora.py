"""The LoRA adapters of the LLM tower as one TP/PP-independent safetensors file (for tools and later stages).

Every LLM2CLIP stage-1 checkpoint (checkpoint/manager.py) holds ``<root>/step<N>/lora.safetensors`` and
``adapter_config.json`` beside its sharded training state; ``<root>/latest`` names the newest step. The file loads at
any TP x PP layout (keys use global layer indices and full, unsharded matrices).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from llm2clip_scale.models.llm.lora import gather_lora_state, load_lora_state
from llm2clip_scale.models.llm.tower import LLMTextEncoder

LORA_FILE = "lora.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_lora_state(tower: LLMTextEncoder) -> dict[str, Tensor]:
    """The whole model's LoRA matrices, TP- and PP-independent, on every rank. Collective over the world.

    ``gather_lora_state`` reassembles TP shards but names adapters by the module path, whose layer index is local to
    the pipeline stage (stage 1 of PP=2 calls global layer 3 ``decoder.layers.0``); keys are renamed to the global
    layer index and the stages' dicts are merged, so a PP=2 checkpoint is a PP=1 checkpoint.
    """
    local = gather_lora_state(tower)
    state = {global_lora_key(tower, key): value for key, value in local.items()}
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


def global_lora_key(tower: LLMTextEncoder, key: str) -> str:
    match = _LAYER_KEY.match(key)
    if match is None:
        raise KeyError(f"LoRA adapter {key} is not inside a decoder layer")
    layer = tower.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{key[match.end():]}"


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
