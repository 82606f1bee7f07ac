"""The LoRA adapters of the LLM tower as one TP/PP-independent safetensors file (for tools and later stages).

Every LLM2CLIP stage-1 checkpoint (checkpoint/manager.py) holds ``<root>/step<N>/lora.safetensors`` and
``adapter_config.json`` beside its sharded training state; ``<root>/latest`` names the newest step. The file loads at
any TP x PP layout (keys use global layer indices and full, unsharded matrices).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from llm2clip_scale.checkpoint.layout import read_adapter_config, resolve_lora_path
from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.models.llm.lora import apply_lora, gather_lora_state, load_lora_state, merge_lora
from llm2clip_scale.models.llm.tower import LLMTextEncoder

log = logging.getLogger("llm2clip_scale.checkpoint")

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


def local_lora_state(tower: LLMTextEncoder, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a :func:`global_lora_state` dict that live on this pipeline stage, under its module names."""
    local_of = {layer.layer_number - 1: index for index, layer in enumerate(tower.decoder.layers)}
    mine: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise KeyError(f"LoRA state key {key} names no decoder layer")
        index = local_of.get(int(match.group(1)))
        if index is not None:  # other layers live on other pipeline stages
            mine[f"decoder.layers.{index}.{key[match.end():]}"] = value
    return mine


def load_global_lora_state(tower: LLMTextEncoder, state: dict[str, Tensor]) -> None:
    """Copy a :func:`global_lora_state` dict (any TP/PP layout) into this rank's adapters."""
    load_lora_state(tower, local_lora_state(tower, state))


def global_lora_key(tower: LLMTextEncoder, key: str) -> str:
    match = _LAYER_KEY.match(key)
    if match is None:
        raise KeyError(f"LoRA adapter {key} is not inside a decoder layer")
    layer = tower.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{key[match.end():]}"


def read_stage1_lora(path: str | Path) -> tuple[dict[str, Tensor], dict, Path]:
    """(LoRA matrices, adapter_config.json, file) of a stage-1 checkpoint: ``lora.safetensors``, a step directory or a
    checkpoint root. Raises FileNotFoundError / ValueError that say which file is missing or unreadable."""
    lora_file = resolve_lora_path(path)
    if not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file}: missing; {path} is not a complete stage-1 checkpoint")
    meta = read_adapter_config(lora_file)
    try:
        state = load_file(str(lora_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{lora_file}: unreadable stage-1 LoRA ({type(err).__name__}: {err})") from err
    return state, meta, lora_file


def check_same_base(tower_cfg: LLMConfig, meta: dict, where: object) -> None:
    """Refuse LoRA trained on another base model; a moved checkpoint directory (same name) only warns."""
    base, seed = meta.get("base_checkpoint"), meta.get("base_seed")
    if (base is None) != (tower_cfg.hf_checkpoint is None):
        raise ValueError(f"{where}: the LoRA was trained on {base or f'the seeded random tower (seed {seed})'}, this "
                         f"tower is {tower_cfg.hf_checkpoint or f'the seeded random tower (seed {tower_cfg.seed})'}")
    if base is None and seed != tower_cfg.seed:
        raise ValueError(f"{where}: the LoRA was trained on the random tower of seed {seed}, model.llm.seed is "
                         f"{tower_cfg.seed}")
    if base is not None and Path(base).name != Path(tower_cfg.hf_checkpoint).name:
        log.warning("%s: the LoRA was trained on %s, model.llm.hf_checkpoint is %s", where, base,
                    tower_cfg.hf_checkpoint)


def merge_stage1_lora(tower: LLMTextEncoder, path: str | Path) -> Path:
    """Fold a stage-1 LoRA (any TP/PP layout it was trained at) into this rank's shard of ``tower``; return its file.

    The adapters are attached with the recorded rank, alpha and targets, filled from the file and merged, so the
    tower computes exactly what the stage-1 model computed in eval mode, at no per-step cost.
    """
    state, meta, lora_file = read_stage1_lora(path)
    check_same_base(tower.cfg, meta, lora_file)
    apply_lora(tower, meta["lora_rank"], meta["lora_alpha"], 0.0, meta["lora_targets"])
    load_global_lora_state(tower, state)
    merge_lora(tower)
    return lora_file
