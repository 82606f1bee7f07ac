"""Fill the megatron text tower from a HuggingFace Llama-family checkpoint, or from a seeded random source.

Supported: Llama 2/3/3.1/3.2 (incl. "llama3" RoPE scaling), Mistral, Qwen2 (q/k/v biases) and the LLM2CLIP
caption-contrastive release (a bidirectional ``LlamaEncoderModel`` whose keys lack the ``model.`` prefix).

Memory. A rank materialises only its own TP/PP shard. Tensors are read with safetensors' ``get_slice``, which
copies just the requested row or column range out of the memory-mapped file, so a tensor that belongs to the rank
is never read whole: the pieces of one local parameter (e.g. this rank's q, k and v row ranges) are read, stitched
into the local layout and copied into the already allocated parameter before the next parameter is touched. Peak
host memory is therefore the tower shard itself plus about twice its largest local parameter (pieces + stitched
copy; ~0.25 GB for Llama-3-8B's fc1 at TP=1 in bf16), never 2x the model. The file pages themselves are page cache
(reclaimable, shared between the ranks of a node), not process memory.

The random path (tiny CPU configs, tests) goes through the same mapping with a source that draws each HF-named
tensor from a generator seeded by (seed, tensor name). Names carry the global layer index, so the weights of a
layer do not depend on the TP or PP layout: PP=2 builds the same function as PP=1, TP=2 the same as TP=1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core import parallel_state
from torch import Tensor

from llm2clip_scale.config.schema import LLMConfig

# HF ``model_type`` values whose decoder layer is the Llama one (RMSNorm, SwiGLU, RoPE, GQA); Qwen2 adds q/k/v biases.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The only RoPE variants megatron's RotaryEmbedding reproduces: plain, and Llama-3.1's frequency-band scaling.
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# A key every Llama-family decoder checkpoint has; what precedes it is the checkpoint's prefix ("model." or "").
_ANCHOR = "layers.0.self_attn.q_proj.weight"
# Architecture fields that must agree between the run's LLMConfig and the checkpoint's config.json.
_ARCH_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
    "rotary_base", "norm_eps", "rope_scaling", "qkv_bias",
)


# --------------------------------------------------------------------------------------------------------- config


def read_hf_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a HuggingFace checkpoint directory")
    return json.loads(config_file.read_text())


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(rope theta, Llama-3 scaling dict) from either transformers-5 ``rope_parameters`` or the older top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), {}
    if rope_type != "llama3":
        raise ValueError(f"RoPE type {rope_type!r} is not supported (only plain RoPE and Llama-3 'llama3' scaling)")
    missing = [key for key in _LLAMA3_ROPE_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"llama3 RoPE scaling lacks {missing} in config.json")
    return float(theta), {key: float(scaling[key]) for key in _LLAMA3_ROPE_KEYS}


def llm_config_from_hf(path: str | Path, **overrides: Any) -> LLMConfig:
    """An LLMConfig describing the checkpoint at ``path`` (its config.json), with ``hf_checkpoint`` pointing at it.

    ``overrides`` set the fields config.json does not decide (max_seq_len, bidirectional, tokenizer, ...).
    Raises ValueError for architectures the tower cannot reproduce exactly, rather than importing them wrongly.
    """
    hf = read_hf_config(path)
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} unsupported; the tower's MLP is SwiGLU (silu)")
    if model_type != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{path}: attention_bias/mlp_bias (biases on o_proj or the MLP) are not supported")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ValueError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}; decoupled head_dim "
                         "(e.g. Mistral-Nemo) is not supported")
    theta, scaling = _rope_from_hf(hf)
    fields: dict[str, Any] = dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        hf_checkpoint=str(path),
    )
    fields.update(overrides)
    max_positions = hf.get("max_position_embeddings")
    if "max_seq_len" not in overrides and max_positions is not None:
        fields["max_seq_len"] = min(LLMConfig.max_seq_len, int(max_positions))
    cfg = LLMConfig(**fields)
    window = hf.get("sliding_window") if (model_type != "qwen2" or hf.get("use_sliding_window")) else None
    if window is not None and int(window) < cfg.max_seq_len:
        raise ValueError(f"{path}: sliding_window {window} < max_seq_len {cfg.max_seq_len}; the tower attends "
                         "globally, so lower max_seq_len to the window")
    return cfg


def check_config_matches(cfg: LLMConfig, path: str | Path) -> None:
    """Raise ValueError if the run's architecture fields disagree with the checkpoint's config.json.

    Shapes alone cannot catch a wrong RoPE base, eps or scaling, which would import "successfully" and be wrong.
    """
    from_hf = llm_config_from_hf(path, max_seq_len=cfg.max_seq_len)
    diffs = [f"{name}: config {getattr(cfg, name)!r} vs checkpoint {getattr(from_hf, name)!r}"
             for name in _ARCH_FIELDS if getattr(cfg, name) != getattr(from_hf, name)]
    if diffs:
        raise ValueError(f"model.llm does not match {path}/config.json (build it with llm_config_from_hf): "
                         + "; ".join(diffs))


# -------------------------------------------------------------------------------------------------------- sources


class TensorSource(Protocol):
    """HF-named full tensors, of which only a row or column range is ever materialised."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        """The whole tensor (dim None) or its [start, stop) range along ``dim`` (0 or 1)."""
        ...


class SafetensorsSource:
    """A single ``model.safetensors`` or a sharded checkpoint with ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").is_file():
            weight_map = {}
        else:
            raise FileNotFoundError(f"{root}: neither model.safetensors nor model.safetensors.index.json found "
                                    "(only safetensors checkpoints are imported)")
        files = sorted(set(weight_map.values())) or ["model.safetensors"]
        # Opening a file only maps it; nothing is read until get_slice(...)[...] is indexed.
        self._handles = {f: stack.enter_context(safe_open(str(root / f), framework="pt")) for f in files}
        if not weight_map:
            weight_map = {name: files[0] for name in self._handles[files[0]].keys()}
        self._file_of = weight_map

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        view = self._handles[self._file_of[name]].get_slice(name)
        if dim is None:
            return view[:]
        return view[start:stop] if dim == 0 else view[:, start:stop]


def _init_for(name: str, cfg: LLMConfig) -> Callable[[tuple[int, ...], torch.Generator], Tensor]:
    """megatron's default init, keyed by HF name: N(0, 0.02); output projections scaled by 1/sqrt(2L); norms 1."""
    std = 0.02
    if name.endswith("norm.weight"):
        return lambda shape, _gen: torch.ones(shape)
    if name.endswith(".bias"):
        return lambda shape, _gen: torch.zeros(shape)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    return lambda shape, gen: torch.randn(shape, generator=gen) * std


class SeededSource:
    """Random HF-layout weights: each tensor drawn whole from a generator seeded by (seed, tensor name).

    Drawing the full tensor on every rank and slicing it is what megatron's use_cpu_initialization does too; it is
    meant for tiny configs. Keying the seed on the name (which holds the global layer index) rather than on
    construction order is what makes the weights independent of the PP layout.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self._shapes = expected_shapes(cfg, prefix="model.")

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        digest = hashlib.sha256(f"{self.cfg.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        full = _init_for(name, self.cfg)(self._shapes[name], gen)
        if dim is None:
            return full
        return full.narrow(dim, start, (stop if stop is not None else full.shape[dim]) - start)


# -------------------------------------------------------------------------------------------------------- mapping


def expected_shapes(cfg: LLMConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every HF tensor the tower consumes, by HF name."""
    h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
    hd = h // heads
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}embed_tokens.weight": (cfg.vocab_size, h),
        f"{prefix}norm.weight": (h,),
    }
    for layer in range(cfg.num_layers):
        p = f"{prefix}layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (groups * hd, h),
            p + "self_attn.v_proj.weight": (groups * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, cfg.ffn_hidden_size),
        })
        if cfg.qkv_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (heads * hd,),
                p + "self_attn.k_proj.bias": (groups * hd,),
                p + "self_attn.v_proj.bias": (groups * hd,),
            })
    return shapes


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one local tower parameter is assembled: HF tensors, each whole (dim None) or as this rank's TP range
    along ``dim``, then combined: "copy" (one piece), "qkv" (megatron's per-group interleave) or "cat" (dim 0)."""

    combine: str
    pieces: tuple[tuple[str, int | None], ...]


def _recipe(name: str, offsets: dict[int, int], prefix: str) -> _Recipe:
    if name == "embedding.word_embeddings.weight":
        return _Recipe("copy", ((f"{prefix}embed_tokens.weight", 0),))  # vocab-parallel: a row range
    if name == "decoder.final_layernorm.weight":
        return _Recipe("copy", ((f"{prefix}norm.weight", None),))
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if match is None:
        raise ValueError(f"tower parameter {name!r} has no HuggingFace counterpart")
    layer = f"{prefix}layers.{offsets[int(match.group(1))]}."
    rest = match.group(2)
    # The TE spec fuses the pre-attention / pre-MLP norms into the following linear; same HF tensors.
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return _Recipe("copy", ((layer + "input_layernorm.weight", None),))
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return _Recipe("copy", ((layer + "post_attention_layernorm.weight", None),))
    qkv = re.fullmatch(r"self_attention\.linear_qkv\.(weight|bias)", rest)
    if qkv:
        # Consecutive query groups are contiguous rows of q, k and v, so this rank's groups are one range of each.
        return _Recipe("qkv", tuple((f"{layer}self_attn.{p}_proj.{qkv.group(1)}", 0) for p in "qkv"))
    if rest == "self_attention.linear_proj.weight":  # row parallel: a column range
        return _Recipe("copy", ((layer + "self_attn.o_proj.weight", 1),))
    if rest == "mlp.linear_fc1.weight":
        # The TP rank computes silu(gate) * up on its own ffn slice, so its shard is cat(gate slice, up slice).
        return _Recipe("cat", ((layer + "mlp.gate_proj.weight", 0), (layer + "mlp.up_proj.weight", 0)))
    if rest == "mlp.linear_fc2.weight":
        return _Recipe("copy", ((layer + "mlp.down_proj.weight", 1),))
    raise ValueError(f"tower parameter {name!r} has no HuggingFace counterpart")


def _interleave_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: LLMConfig) -> Tensor:
    """Local q/k/v row ranges -> megatron's fused layout: per query group [q (heads/groups * hd), k (hd), v (hd)]."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups_local = k.shape[0] // hd
    tail = q.shape[1:]
    parts = [q.reshape(groups_local, -1, *tail), k.reshape(groups_local, hd, *tail),
             v.reshape(groups_local, hd, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _detect_prefix(names: set[str], where: object) -> str:
    """'model.' for *ForCausalLM / LlamaModel saves, '' for the LLM2CLIP encoder release (keys without it)."""
    prefixes = sorted(name[: -len(_ANCHOR)] for name in names if name.endswith(_ANCHOR))
    if len(prefixes) != 1:
        raise ValueError(f"{where}: cannot locate the decoder layers (looked for keys ending in {_ANCHOR!r}, found "
                         f"prefixes {prefixes})")
    return prefixes[0]


@torch.no_grad()
def load_into_tower(tower: torch.nn.Module, source: TensorSource, where: object = "source") -> None:
    """Copy ``source``'s HF-layout weights into this rank's TP/PP shard of ``tower``, one parameter at a time.

    Raises ValueError listing every missing HF tensor, naming a tensor whose shape disagrees with the config
    (expected and actual shape), or listing checkpoint tensors of this rank's layers that the tower has no place
    for (e.g. q/k/v biases with qkv_bias=False), so a mismatch can never load silently.
    """
    cfg: LLMConfig = tower.cfg
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if cfg.num_query_groups % tp_size or cfg.vocab_size % tp_size or cfg.ffn_hidden_size % tp_size:
        raise ValueError(f"TP={tp_size} must divide num_query_groups, vocab_size and ffn_hidden_size ({cfg})")
    names = source.names()
    prefix = _detect_prefix(names, where)
    shapes = expected_shapes(cfg, prefix)
    # Megatron numbers layers globally from 1; the HF index of local layer i is its global index.
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(tower.decoder.layers)}
    params = dict(tower.named_parameters())
    recipes = {name: _recipe(name, offsets, prefix) for name in params}

    needed = {hf for recipe in recipes.values() for hf, _ in recipe.pieces}
    missing = sorted(needed - names)
    if missing:
        raise ValueError(f"{where}: {len(missing)} tensor(s) needed by this rank are missing from the checkpoint: "
                         + ", ".join(missing))
    local_layers = tuple(f"{prefix}layers.{g}." for g in offsets.values())
    unexpected = sorted(n for n in names - needed if n.startswith(local_layers) and not n.endswith("inv_freq"))
    if unexpected:
        raise ValueError(f"{where}: checkpoint tensors with no place in the tower (check qkv_bias and the "
                         f"architecture): {', '.join(unexpected)}")
    for hf in sorted(needed):  # check every shape before writing anything
        if tuple(source.shape(hf)) != shapes[hf]:
            raise ValueError(f"HF tensor {hf!r}: expected shape {shapes[hf]} from the config, checkpoint has "
                             f"{tuple(source.shape(hf))}")

    for name, param in params.items():
        pieces = []
        for hf, dim in recipes[name].pieces:
            if dim is None:
                pieces.append(source.read(hf))
            else:
                per = shapes[hf][dim] // tp_size
                pieces.append(source.read(hf, dim, tp_rank * per, (tp_rank + 1) * per))
        combine = recipes[name].combine
        value = (pieces[0] if combine == "copy" else torch.cat(pieces, dim=0) if combine == "cat"
                 else _interleave_qkv(*pieces, cfg))
        if value.shape != param.shape:  # only reachable if megatron's local layout changed under us
            raise ValueError(f"tower parameter {name!r}: built {tuple(value.shape)} from the checkpoint, the local "
                             f"shard is {tuple(param.shape)}")
        param.copy_(value)
        # At most one parameter's pieces and stitched value are alive at a time (see the module docstring).
        del pieces, value


def load_hf_checkpoint(tower: torch.nn.Module, path: str | Path) -> None:
    """Import the HF safetensors checkpoint at ``path`` into this rank's shard of ``tower`` (streamed)."""
    check_config_matches(tower.cfg, path)
    with contextlib.ExitStack() as stack:
        load_into_tower(tower, SafetensorsSource(path, stack), where=str(path))


def init_seeded(tower: torch.nn.Module, seed: int | None = None) -> None:
    """Random weights that depend only on (seed, global tensor name): identical functions for every TP/PP layout."""
    cfg = tower.cfg if seed is None else dataclasses.replace(tower.cfg, seed=seed)
    load_into_tower(tower, SeededSource(cfg), where=f"seeded init (seed {cfg.seed})")
