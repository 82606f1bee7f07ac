"""The LLM as a transformers folder: base weights streamed by HF name, the LoRA deltas added on the way.

Each base tensor is read whole from the run's source — ``hf_import.SafetensorsSource`` (the HF checkpoint) or
``hf_import.SeededSource`` (the tiny configs' seeded weights) — both of which already use HF names, so the megatron
model is never built here. The LoRA file holds full (TP=1) matrices under megatron names; they map onto HF names:

    linear_qkv  A.q/B.q, A.k/B.k, A.v/B.v  ->  self_attn.q_proj / k_proj / v_proj
    linear_proj A.o/B.o                     ->  self_attn.o_proj
    linear_fc1  A.gate/B.gate, A.up/B.up    ->  mlp.gate_proj / up_proj
    linear_fc2  A.down/B.down               ->  mlp.down_proj

A target's B rows are that projection's own rows in HF order (models/llm/lora.py: per query group for q/k/v, which
is how HF orders q_proj rows; the [gate, up] split of fc1), so ``W_hf += (alpha / r) * B @ A`` exactly, summed in
fp32 and rounded once to the export dtype — for the stage-1 LoRA of ``model.llm.lora_init`` and then for a LoRA the
checkpoint itself trained (stage 1, or stage 2 with ``model.llm.lora_rank > 0``). Names follow transformers'
``LlamaModel`` (no ``model.`` prefix), which is also the layout of LLM2CLIP's released encoder and what ``hf_import``
reads back.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.export.shards import write_sharded
from llm2clip_scale.export.source import ExportError, read_adapter_config

_LORA_KEY = re.compile(
    r"^decoder\.layers\.(\d+)\.(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)"
    r"\.lora\.([AB])\.(\w+)$"
)
# (megatron linear, LoRA target) -> HF module under layers.<i>.
_HF_MODULE = {
    ("self_attention.linear_qkv", "q"): "self_attn.q_proj",
    ("self_attention.linear_qkv", "k"): "self_attn.k_proj",
    ("self_attention.linear_qkv", "v"): "self_attn.v_proj",
    ("self_attention.linear_proj", "o"): "self_attn.o_proj",
    ("mlp.linear_fc1", "gate"): "mlp.gate_proj",
    ("mlp.linear_fc1", "up"): "mlp.up_proj",
    ("mlp.linear_fc2", "down"): "mlp.down_proj",
}
_ANCHOR = "layers.0.self_attn.q_proj.weight"
_ARCH_CLASS = {"llama": "LLM2CLIPLlamaEncoder", "qwen2": "LLM2CLIPQwen2Encoder", "mistral": "LLM2CLIPMistralEncoder"}


class LoRAFactors:
    """The stage-1 LoRA as HF-named (A, B) pairs and its scaling alpha / r; deltas are computed on demand."""

    def __init__(self, lora_file: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.file = lora_file
        self.meta = read_adapter_config(lora_file)
        self.rank, self.alpha = int(self.meta["lora_rank"]), float(self.meta["lora_alpha"])
        self.scaling = self.alpha / self.rank
        try:
            state = load_file(str(lora_file))
        except (SafetensorError, OSError) as err:
            raise ExportError(f"{lora_file}: unreadable LoRA file ({err}); restore it from the stage-1 run") from None
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            match = _LORA_KEY.match(key)
            hf = match and _HF_MODULE.get((match.group(2), match.group(4)))
            if not hf:
                raise ExportError(f"{lora_file}: key {key!r} is no LoRA matrix of a q/k/v/o/gate/up/down projection")
            pairs.setdefault(f"layers.{match.group(1)}.{hf}.weight", {})[match.group(3)] = value
        incomplete = sorted(name for name, pair in pairs.items() if set(pair) != {"A", "B"})
        if incomplete:
            raise ExportError(f"{lora_file}: LoRA {incomplete[0]} lacks its A or B matrix; the file is incomplete")
        self.pairs = pairs

    def delta(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        """``(alpha / r) * B @ A`` in fp32 for the HF weight ``name`` (None when the LoRA does not touch it)."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a, b = pair["A"].float(), pair["B"].float()
        if a.shape[0] != self.rank or b.shape[1] != self.rank or (b.shape[0], a.shape[1]) != tuple(shape):
            raise ExportError(f"{self.file}: LoRA of {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do "
                              f"not give rank {self.rank} updates of its shape {tuple(shape)}")
        return self.scaling * (b @ a)

    def describe(self) -> dict:
        from llm2clip_scale.checkpoint.layout import sha256_file

        return {"file": str(self.file.resolve()), "sha256": sha256_file(self.file), "rank": self.rank,
                "alpha": self.alpha, "scaling": self.scaling, "targets": self.meta.get("lora_targets"),
                "merged_weights": len(self.pairs)}


def base_hf_config(llm: LLMConfig) -> dict:
    """The base checkpoint's config.json ({} for the seeded tiny configs)."""
    if not llm.hf_checkpoint:
        return {}
    path = Path(llm.hf_checkpoint) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"model.llm.hf_checkpoint: {path} unreadable ({err})") from None


def model_type_of(llm: LLMConfig) -> str:
    """transformers' model_type of the run's LLM: the base checkpoint's own, else Qwen2 for q/k/v biases, else Llama."""
    if llm.hf_checkpoint:
        return str(base_hf_config(llm).get("model_type", "llama"))
    return "qwen2" if llm.qkv_bias else "llama"


def weight_specs(llm: LLMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every decoder weight in file order: embeddings, layers in order, final norm."""
    from llm2clip_scale.models.llm.hf_import import expected_shapes

    shapes = expected_shapes(llm, prefix="")
    tail = ["norm.weight"]
    return [(n, s) for n, s in shapes.items() if n not in tail] + [(n, shapes[n]) for n in tail]


def hf_text_config(llm: LLMConfig, tokenizer, dtype: torch.dtype, llm2clip: dict) -> dict:
    """config.json: the transformers config of the exported decoder, with ``auto_map`` to the modeling file and the
    ``llm2clip`` section (bidirectional, pooling, caption format, adapter, logit scale, provenance)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type = model_type_of(llm)
    if model_type not in _ARCH_CLASS:
        raise ExportError(f"model.llm: model_type {model_type!r} cannot be exported; supported: {sorted(_ARCH_CLASS)}")
    base = base_hf_config(llm)
    rope: dict = {"rope_type": "default", "rope_theta": float(llm.rotary_base)}
    if llm.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": float(llm.rotary_base), **llm.rope_scaling}
    fields = dict(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups, rms_norm_eps=llm.norm_eps, hidden_act="silu",
        max_position_embeddings=int(base.get("max_position_embeddings", llm.max_seq_len)), rope_parameters=rope,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if model_type == "llama":
        cls = LlamaConfig
        fields.update(attention_bias=False, mlp_bias=False, head_dim=llm.hidden_size // llm.num_attention_heads)
    elif model_type == "qwen2":
        cls = Qwen2Config
        fields.update(use_sliding_window=False)  # the tower attends globally (hf_import refuses smaller windows)
    else:
        cls = MistralConfig
        fields.update(sliding_window=None, head_dim=llm.hidden_size // llm.num_attention_heads)
    config = cls(**fields)
    config.dtype = dtype
    name = _ARCH_CLASS[model_type]
    return {**config.to_diff_dict(), "architectures": [name],
            "auto_map": {"AutoModel": f"modeling_llm2clip.{name}"}, "llm2clip": llm2clip}


@contextlib.contextmanager
def open_base_source(llm: LLMConfig):
    """The run's base LLM weights by HF name, with the prefix of its names ('model.' or '')."""
    from llm2clip_scale.models.llm import hf_import

    with contextlib.ExitStack() as stack:
        if llm.hf_checkpoint:
            try:
                hf_import.check_config_matches(llm, llm.hf_checkpoint)
                source = hf_import.SafetensorsSource(llm.hf_checkpoint, stack)
            except (ValueError, FileNotFoundError) as err:
                raise ExportError(f"model.llm.hf_checkpoint: {err}") from None
        else:
            source = hf_import.SeededSource(llm)
        prefixes = sorted(name[: -len(_ANCHOR)] for name in source.names() if name.endswith(_ANCHOR))
        if len(prefixes) != 1:
            raise ExportError(f"model.llm.hf_checkpoint: no single decoder prefix found (looked for '*{_ANCHOR}', "
                              f"found {prefixes})")
        yield source, prefixes[0]


def write_text_weights(
    llm: LLMConfig,
    loras: list[LoRAFactors],
    extra: dict[str, Tensor],
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    on_tensor: Callable[[str, Tensor], None] | None = None,
) -> dict[str, str]:
    """Stream the decoder (+ the LoRA deltas, in the order training applied them) and ``extra`` (adapter, logit
    scale: already HF-named) into shards."""
    specs = weight_specs(llm)
    names = {name for name, _ in specs}
    for lora in loras:
        unknown = sorted(set(lora.pairs) - names)
        if unknown:
            raise ExportError(f"{lora.file}: LoRA for {unknown[0]}, which this model.llm does not have (layers "
                              f"{llm.num_layers}); the LoRA belongs to another base model")
    with open_base_source(llm) as (source, prefix):
        available = source.names()
        for name, shape in specs:
            found = tuple(source.shape(prefix + name)) if prefix + name in available else None
            if found != tuple(shape):
                raise ExportError(f"model.llm.hf_checkpoint: {prefix + name} has shape {found}, the config expects "
                                  f"{tuple(shape)}")

        def produce(name: str) -> Tensor:
            if name in extra:
                return extra[name]
            value = source.read(prefix + name).float()
            for lora in loras:  # base + stage-1 delta (lora_init, merged at build) + a stage-2 delta, in fp32
                delta = lora.delta(name, tuple(value.shape))
                if delta is not None:
                    value = value + delta
            return value

        all_specs = specs + [(name, tuple(value.shape)) for name, value in extra.items()]
        return write_sharded(out_dir, all_specs, produce, dtype, max_shard_bytes, on_tensor)
