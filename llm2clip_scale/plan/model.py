"""Parameter counts and activation sizes of the configured towers, from shapes alone (no weights, no GPU).

Parameters: the vision tower is built by the training builder itself on torch's meta device (lock, LoRA, head as
training has them), the adapter on meta too; the LLM shard of one (TP, PP) rank is counted from its config
(megatron's layout: vocab-parallel embedding on the first stage, q/k/v, o, gate/up, down split over TP, the two
RMSNorms of each layer and the final norm replicated) — tests/test_plan.py checks all three against built models.

Vision activations (what autograd keeps for backward of one micro-batch), for the pre- and post-norm ViT blocks of
timm (Block, EvaBlock[PostNorm]) with fused attention (F.scaled_dot_product_attention), counted per token of a
block by walking its modules: every Linear keeps its input (in_features), every LayerNorm its input (width) plus a
mean and an rstd (fp32 on a GPU), the attention core q, k, v (qkv.out_features; one storage) and a log-sum-exp per
head in fp32 (its output is the proj's input, counted there), an MLP's activation its input (fc1.out_features), a
LayerScale its input. For a standard block of width d and MLP width m that is 8d + 2m elements (norm 1 and 2 in,
qkv in, q/k/v, attention out, fc1 in, GELU in, fc2 in) + 4 statistics + heads fp32 per token. Outside the blocks:
the images (the patch embedding's input), the final norm's input and output (the pooled token is a view of it), an
attention pool's k and v and its latent-token MLP, the head's input.
Gradient checkpointing (timm's non-reentrant per block) keeps only each block's input (d per token) plus the same
outside terms; backward then re-runs one block at a time, so its peak adds one block's full activations (an upper
estimate: the re-run block's tensors are freed as its backward proceeds; tests/test_plan.py bounds torch's
MemTracker peak with it).
Modules the walker has no rule for (rotary embeddings, SwiGLU, dropout masks) make the estimate approximate,
which the report says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm2clip_scale.config.schema import AdapterConfig, Config, LLMConfig

# Leaf modules that keep nothing for backward, or whose saves another rule counts (an MLP's activation).
_PASSIVE = (nn.Identity, nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh)


@dataclass(frozen=True)
class VisionShape:
    """What the memory model needs of the vision tower."""

    params: int
    trainable: int
    blocks: int
    tokens: int  # tokens in the blocks (after patch dropout)
    width: int
    block_elements: int  # per token of one block, in the activation dtype
    block_stats: int  # per token of one block: LayerNorm mean and rstd (fp32 on a GPU)
    block_fp32: int  # per token of one block, always fp32 (attention's log-sum-exp)
    outside_elements: int  # per sample, outside the blocks (images, final norm, pool, head input)
    outside_stats: int
    outside_fp32: int
    exact: bool  # every module of a block had a rule
    unknown: tuple[str, ...] = ()


def _block_per_token(block: nn.Module) -> tuple[int, int, int, list[str]]:
    """(elements, norm statistics, fp32 elements, module types without a rule) kept per token by one block."""
    from timm.layers import LayerScale, Mlp

    elements = stats = fp32 = 0
    unknown: list[str] = []
    for module in block.modules():
        if isinstance(module, nn.Linear):
            elements += module.in_features
        elif isinstance(module, nn.LayerNorm):
            elements += int(module.normalized_shape[-1])
            stats += 2
        elif isinstance(module, Mlp):
            if not isinstance(module.act, nn.GELU | nn.ReLU | nn.SiLU | nn.Tanh):
                unknown.append(type(module.act).__name__)
            elements += module.fc1.out_features  # the activation's input
        elif isinstance(module, LayerScale):
            elements += int(module.gamma.shape[-1])
        elif hasattr(module, "qkv") and hasattr(module, "num_heads"):
            elements += module.qkv.out_features
            fp32 += int(module.num_heads)
            if not getattr(module, "fused_attn", True):
                unknown.append("unfused attention")
        elif isinstance(module, nn.Dropout) and module.p > 0:
            unknown.append("Dropout")
        elif not isinstance(module, _PASSIVE) and not list(module.children()):
            unknown.append(type(module).__name__)
    return elements, stats, fp32, unknown


def vision_shape(cfg: Config) -> VisionShape:
    """Parameters and activation coefficients of the configured vision tower (built on the meta device)."""
    from llm2clip_scale.metrics.flops import _trunk_tokens
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    tower = build_vision_tower(cfg.model.vision, cfg.model.embed_dim, device="meta")
    trunk = tower.trunk
    params = sum(p.numel() for p in tower.parameters())
    trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    _, tokens = _trunk_tokens(trunk, cfg.model.vision.patch_dropout)
    blocks = list(trunk.blocks)
    elements, stats, fp32, unknown = _block_per_token(blocks[0])
    if trainable < params - sum(p.numel() for p in tower.head.parameters()):  # a frozen trunk keeps less
        unknown.append("frozen trunk parameters (lock/LoRA keep less than counted)")
    if cfg.model.vision.patch_dropout > 0:
        unknown.append("patch dropout (the pre-drop tokens are not counted)")
    width = int(trunk.num_features if hasattr(trunk, "num_features") else tower.head.in_features)
    image = 3 * cfg.model.vision.image_size**2
    outside = image + 2 * tokens * width  # images; final norm input and output (pooling views the output)
    outside_stats, outside_fp32 = 2 * tokens, 0
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        latent = int(pool.latent_len)
        hidden = pool.mlp.fc1.out_features
        # k and v of every token; on the latent tokens q, the attention output, norm in/out, fc1 out, GELU out.
        outside += 2 * tokens * width + latent * (4 * width + 2 * hidden) + tower.head.in_features
        outside_stats += 2 * latent
        outside_fp32 += latent * int(pool.num_heads)
    elif getattr(trunk, "global_pool", "token") != "token":
        outside += tower.head.in_features  # a mean pool makes a new tensor; the token pool is a view
    return VisionShape(params, trainable, len(blocks), tokens, width, elements, stats, fp32, outside, outside_stats,
                       outside_fp32, not unknown, tuple(sorted(set(unknown))))


def vision_activation_bytes(shape: VisionShape, samples: int, act_bytes: int, checkpointing: bool,
                            stats_bytes: int = 4) -> tuple[int, int]:
    """(kept after the forward, peak during backward) activation bytes of ``samples`` images; ``stats_bytes``: the
    LayerNorm statistics' size (fp32 on a GPU whatever the input; the CPU kernel keeps them in the input's dtype)."""
    outside = samples * (shape.outside_elements * act_bytes + shape.outside_stats * stats_bytes
                         + shape.outside_fp32 * 4)
    block = samples * shape.tokens * (shape.block_elements * act_bytes + shape.block_stats * stats_bytes
                                      + shape.block_fp32 * 4)
    if not checkpointing:
        return shape.blocks * block + outside, shape.blocks * block + outside
    kept = shape.blocks * samples * shape.tokens * shape.width * act_bytes + outside
    return kept, kept + block  # one block re-run at a time


# ------------------------------------------------------------------------------------------------- adapter


def adapter_params(adapter: AdapterConfig, embed_dim: int) -> int:
    """Residual MLP blocks (LayerNorm, d -> e·d -> d) + LayerNorm + projection, all with biases."""
    d, h = adapter.input_dim, adapter.expansion * adapter.input_dim
    return adapter.num_blocks * (2 * d + d * h + h + h * d + d) + 2 * d + d * embed_dim + embed_dim


def adapter_activation_elements(adapter: AdapterConfig) -> tuple[int, int]:
    """(elements, fp32) kept per sample: normalize's input, per block norm in/out, fc1 out and GELU out, the final
    norm's in/out."""
    d, h = adapter.input_dim, adapter.expansion * adapter.input_dim
    return d + adapter.num_blocks * (2 * d + 2 * h) + 2 * d, 2 * (adapter.num_blocks + 1) + 1


# ----------------------------------------------------------------------------------------------------- LLM


def _head_dim(llm: LLMConfig) -> int:
    return llm.hidden_size // llm.num_attention_heads


def llm_layer_params(llm: LLMConfig, tp: int = 1) -> int:
    """One decoder layer's parameters on one of ``tp`` tensor-parallel ranks."""
    h, kv = llm.hidden_size, _head_dim(llm)
    qkv_rows = (llm.num_attention_heads + 2 * llm.num_query_groups) * kv
    split = qkv_rows * h + (qkv_rows if llm.qkv_bias else 0) + llm.num_attention_heads * kv * h
    split += 3 * llm.ffn_hidden_size * h  # gate, up, down
    return split // tp + 2 * h  # the two RMSNorms are replicated


def llm_shard_params(llm: LLMConfig, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """Parameters of the LLM tower on one rank of pipeline stage ``stage`` (the first holds the embedding, the last
    the final norm; an embedder has no LM head)."""
    params = llm.num_layers // pp * llm_layer_params(llm, tp)
    if stage == 0:
        params += llm.vocab_size * llm.hidden_size // tp
    if stage == pp - 1:
        params += llm.hidden_size
    return params


def llm_lora_params(llm: LLMConfig, tp: int = 1, pp: int = 1) -> int:
    """LoRA parameters on one rank (every stage has num_layers / pp layers). Column-parallel linears (q/k/v, gate/up)
    keep A (r x in) whole and split B's rows; row-parallel ones (o, down) split A's columns and keep B whole."""
    h, kv, r = llm.hidden_size, _head_dim(llm), llm.lora_rank
    rows = {"q": llm.num_attention_heads * kv, "k": llm.num_query_groups * kv, "v": llm.num_query_groups * kv,
            "gate": llm.ffn_hidden_size, "up": llm.ffn_hidden_size}
    row_parallel = {"o": (llm.num_attention_heads * kv, h), "down": (llm.ffn_hidden_size, h)}
    per_layer = 0
    for target in llm.lora_targets:
        if target in rows:
            per_layer += r * h + rows[target] // tp * r
        elif target in row_parallel:
            width, out = row_parallel[target]
            per_layer += r * width // tp + out * r
    return llm.num_layers // pp * per_layer


def llm_inference_bytes_per_token(llm: LLMConfig, tp: int, act_bytes: int) -> int:
    """Working set per token of a no-grad forward (one layer live at a time): the residual and normed hidden
    states, q/k/v, the attention output and gate, up and their product (APPROXIMATE: allocator slack not counted)."""
    h, kv = llm.hidden_size, _head_dim(llm)
    qkv = (llm.num_attention_heads + 2 * llm.num_query_groups) * kv
    return act_bytes * (3 * h + (qkv + 3 * llm.ffn_hidden_size) // tp)


def llm_training_bytes_per_token(llm: LLMConfig, tp: int, seq: int, act_bytes: int) -> float:
    """Activations one layer keeps for backward per token (APPROXIMATE): Korthikanti et al. 2022, eq. 2 with
    tensor parallelism, s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes in 16-bit, for a GPT layer with a 4h MLP and
    unfused attention (the local layer spec a LoRA tower uses); scaled here to act_bytes. Llama's SwiGLU (3.5h) and
    grouped queries keep roughly as much as that MLP, and no dropout masks are kept; read it as +-20%."""
    h, a = llm.hidden_size, llm.num_attention_heads
    return h * (10 + 24 / tp + 5 * a * seq / (h * tp)) * act_bytes / 2


def meta_adapter_params(adapter: AdapterConfig, embed_dim: int) -> int:
    """The adapter's parameters counted on a module built on the meta device (what the formula is checked against)."""
    from llm2clip_scale.models.adapter import LLMAdapter

    with torch.device("meta"):
        return sum(p.numel() for p in LLMAdapter(adapter, embed_dim).parameters())
