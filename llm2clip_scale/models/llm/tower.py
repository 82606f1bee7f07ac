"""The LLM text tower: a Llama-architecture megatron-core encoder that returns mean-pooled caption embeddings.

It composes megatron's vocab-parallel LanguageModelEmbedding, RotaryEmbedding and TransformerBlock instead of
using GPTModel: an embedder has no use for the LM head, which alone is 0.5B parameters for Llama-3-8B.
Tensor parallelism comes from megatron's TP group (set up by ``build_topology``). Pipeline stages are expressed
the way GPTModel does it (``pre_process`` owns the embedding, ``post_process`` the final norm and pooling, and
``set_input_tensor`` feeds later stages); ``embed.embed_local_batch`` drives them with megatron's pipeline
schedule. Weights come from a HuggingFace checkpoint or a seeded source keyed by tensor name (``hf_import``), so
every TP/PP layout of one config computes the same function.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.kernels import build_rmsnorm, megatron_layer_spec_name

log = logging.getLogger(__name__)


def llm_transformer_config(
    cfg: LLMConfig, params_dtype: torch.dtype = torch.float32, perform_initialization: bool = True
) -> TransformerConfig:
    """megatron TransformerConfig of a Llama-family model (RMSNorm, SwiGLU, RoPE, GQA, no dropout; q/k/v biases
    only with ``cfg.qkv_bias``, as in Qwen2)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # With megatron's own init, host allocation draws master weights whole and slices them per TP rank (the
        # on-device init seeds TP ranks differently). Without it (build_text_tower: hf_import fills every weight)
        # parameters are allocated where torch.cuda.current_device() says — the GPU, so no rank stages its shard on
        # the host (8 GB a rank for Llama-3-8B at TP=2 in bf16); the CPU under distributed/cpu_compat.py.
        use_cpu_initialization=perform_initialization,
        perform_initialization=perform_initialization,
        # The fused kernels below need apex / TE / CUDA extensions, which are optional GPU-only extras.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def uses_lora(cfg: LLMConfig) -> bool:
    """Adapters are attached to this tower at some point: trained (lora_rank) or merged from stage 1 (lora_init)."""
    return cfg.lora_rank > 0 or bool(cfg.lora_init)


def layer_spec_name(cfg: LLMConfig) -> str:
    """``model.llm.layer_spec`` resolved: "local" or "transformer_engine".

    ``auto`` takes the kernel registry's choice (TE's fused layers when TE runs on a GPU), except that a tower
    carrying LoRA is pinned to the local spec: TE fuses the input norm into linear_qkv / linear_fc1, so an adapter
    hooked on that linear would see the un-normalised input (lora.py refuses TE linears). Validation rejects an
    explicit ``transformer_engine`` with LoRA before any rank starts.
    """
    if cfg.layer_spec != "auto":
        return cfg.layer_spec
    chosen = megatron_layer_spec_name()
    if chosen != "local" and uses_lora(cfg):
        log.info("model.llm.layer_spec auto: local, not %s — the tower carries LoRA", chosen)
        return "local"
    return chosen


class RegistryRMSNorm:
    """megatron's norm interface ``(config, hidden_size, eps)`` over the kernel registry's ``rmsnorm`` choice: apex's
    or TE's fused RMSNorm on a GPU node that has them, else torch.nn.RMSNorm (what megatron's WrappedTorchNorm
    builds). Parameters in the tower's dtype, as megatron's own fused norms (TENorm, FusedLayerNorm) hold them: a
    bf16 input beside an fp32 weight would also keep torch off its fused rms_norm. Only frozen towers and LoRA train
    here, so a bf16 norm weight never takes updates."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> nn.Module:
        return build_rmsnorm(hidden_size, eps=eps).to(dtype=config.params_dtype)


def _block_spec(choice: str, bidirectional: bool, config: TransformerConfig) -> TransformerBlockSubmodules:
    """The decoder block: this pipeline stage's layers and the final norm, both following ``choice``. Handing
    megatron a layer spec alone would let it pick the final norm by what is installed, not by the spec: TENorm
    whenever TE imports (also under the local spec), apex's FusedLayerNorm with apex alone (which rejects RMSNorm)."""
    if choice == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm: type = TENorm
    else:
        final_norm = RegistryRMSNorm
    layer = _layer_spec(choice, bidirectional)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=final_norm)


def _layer_spec(choice: str, bidirectional: bool) -> ModuleSpec:
    """Megatron's layer spec by name, with the attention mask type the tower's masks are built for; the local spec's
    norms are the kernel registry's (``RegistryRMSNorm``), the TE spec's are TE's, fused into the linears."""
    if choice == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
        # TE reads a padding mask as keys only, (b, 1, 1, L) (attention_mask_for); causal + padding is its own type.
        mask_type = AttnMaskType.padding if bidirectional else AttnMaskType.padding_causal
    elif choice == "local":
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RegistryRMSNorm
        # "padding" makes the softmax always honour our explicit (b, 1, L, L) mask; with "causal" megatron's fused
        # CUDA kernel would apply its own triangle and ignore the mask, i.e. attend to padding and never be
        # bidirectional.
        mask_type = AttnMaskType.padding
    else:
        raise ValueError(f"model.llm.layer_spec: {choice!r} unknown; use auto, local or transformer_engine")
    attention = spec.submodules.self_attention
    spec.submodules.self_attention = dataclasses.replace(
        attention, params={**attention.params, "attn_mask_type": mask_type}
    )
    return spec


def attention_mask_for(spec: str, attention_mask: Tensor, bidirectional: bool) -> Tensor:
    """(b, L) 1=token/0=pad -> the mask the layer spec reads, True = may NOT attend (megatron convention).

    Local spec: (b, 1, L, L), the whole pattern (padded keys; with causal attention the future too). Pad *queries*
    keep their rows unmasked so that no softmax row is empty (they never reach the pooled output). Transformer
    Engine: (b, 1, 1, L), padded keys only — its "padding" / "padding_causal" mask types add the triangle
    themselves and do not read a (b, 1, L, L) mask as a pattern.
    """
    keep = attention_mask.bool()
    masked = ~keep[:, None, None, :]  # (b, 1, 1, L): masked keys
    if spec == "transformer_engine":
        return masked
    length = keep.shape[1]
    if not bidirectional:
        future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=keep.device), diagonal=1)
        masked = masked | future
    return masked.expand(-1, 1, length, length)


def _mark_tensor_parallel_weights(model: torch.nn.Module, gated_mlp: bool) -> None:
    """Set megatron's TP attributes (tensor_model_parallel, partition_dim, partition_stride) on sharded weights.

    megatron sets them inside its init functions only, so with perform_initialization=False the weights of
    vocab-parallel embeddings and parallel linears would look replicated to grad clipping, optimizers and
    checkpoint code. Strides mirror what megatron's init would set: 2 for the gated fc1 ([gate, up] per rank).
    """
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding):
            dim, stride = 0, 1
        elif isinstance(module, ColumnParallelLinear):
            dim, stride = 0, 2 if gated_mlp and name.endswith("linear_fc1") else 1
        elif isinstance(module, RowParallelLinear):
            dim, stride = 1, 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, stride)


class LLMTextEncoder(MegatronModule):
    """Llama-style encoder: token ids (b, L) + padding mask -> mean-pooled final-RMSNorm hidden states (b, hidden)."""

    def __init__(
        self,
        cfg: LLMConfig,
        config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config=config)
        self.cfg = cfg
        self.bidirectional = cfg.bidirectional
        self.layer_spec = layer_spec_name(cfg)
        self.pre_process = pre_process
        self.post_process = post_process
        # Read by megatron's pipeline schedules to pick the p2p tensor shapes.
        self.model_type = ModelType.encoder_or_decoder
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=cfg.vocab_size,
                max_sequence_length=cfg.max_seq_len,
                position_embedding_type="rope",
            )
        # Every stage applies RoPE in its own layers; the module only holds inv_freq (not a checkpointed weight).
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=cfg.rotary_base,
            use_cpu_initialization=True,  # inv_freq computed on the host, as transformers does: the same bits
        )
        if cfg.rope_scaling:
            # Llama-3.1/3.2 rescale RoPE's low-frequency bands; megatron's helper implements HF's "llama3" formula
            # but its constructor only exposes the factor, so the other band parameters are applied here.
            self.rotary_pos_emb.inv_freq = self.rotary_pos_emb._apply_scaling(
                self.rotary_pos_emb.inv_freq, **{k: float(v) for k, v in cfg.rope_scaling.items()}
            )
        self.decoder = TransformerBlock(
            config=config,
            spec=_block_spec(self.layer_spec, cfg.bidirectional, config),
            post_layer_norm=True,
            pre_process=pre_process,
            post_process=post_process,
        )
        if not config.perform_initialization:
            _mark_tensor_parallel_weights(self, config.gated_linear_unit)

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Pipeline hook: a non-first stage receives the previous stage's hidden states here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def build_attention_mask(self, attention_mask: Tensor) -> Tensor:
        return attention_mask_for(self.layer_spec, attention_mask, self.bidirectional)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pool_mask: Tensor | None = None,
        return_hidden_states: bool = False,
    ) -> Tensor:
        """Embed padded captions (right or left padding).

        ``pool_mask`` (b, L), defaulting to ``attention_mask``, selects which tokens are averaged; LLM2CLIP
        excludes instruction tokens from the mean while still letting captions attend to them. Returns
        (b, hidden) float32 on the last pipeline stage, and the stage's (L, b, hidden) activations elsewhere.
        ``return_hidden_states`` makes the last stage return the final-norm token states (b, L, hidden) instead
        of pooling them (MNTP heads, checkpoint verification against HF).
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected input_ids and attention_mask of one (b, L) shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        length = input_ids.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len {self.cfg.max_seq_len}")
        mask = self.build_attention_mask(attention_mask)
        # RoPE positions are 0..L-1 for every row. Left padding still embeds like right padding: rotary attention
        # scores depend only on relative positions, and pad keys are masked (tests/test_llm_tower.py checks it).
        rotary_pos_emb = self.rotary_pos_emb(length)
        hidden = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary_pos_emb)
        if not self.post_process:
            return hidden
        if return_hidden_states:
            return hidden.transpose(0, 1)
        weights = (attention_mask if pool_mask is None else pool_mask).to(torch.float32)
        weights = weights.transpose(0, 1).unsqueeze(-1)  # (L, b, 1), megatron is sequence-first
        summed = (hidden.float() * weights).sum(dim=0)
        return summed / weights.sum(dim=0).clamp(min=1.0)

    def freeze(self) -> LLMTextEncoder:
        """Stage 2 keeps the tower fixed: no gradients, eval mode (also disables any dropout)."""
        self.requires_grad_(False)
        self.eval()
        return self


def build_text_tower(
    cfg: LLMConfig,
    params_dtype: torch.dtype = torch.float32,
    trainable: bool = False,
    device: torch.device | str | None = None,
) -> LLMTextEncoder:
    """Build this rank's TP/PP shard of the tower: weights from ``cfg.hf_checkpoint`` or drawn from ``cfg.seed``.

    Requires megatron parallel_state (``build_topology``). megatron's own initialisation is skipped (it would draw
    every master weight only to be overwritten): parameters are allocated empty and filled one at a time by
    ``hf_import``, either streamed from the checkpoint (only this rank's slices are read) or drawn from generators
    seeded by (cfg.seed, HF tensor name). Either way the weights do not depend on the TP or PP layout, so TP=2 and
    PP=2 shards are pieces of the TP=1 model. ``cfg.lora_init`` (a stage-1 checkpoint) is then merged into the
    weights. The caller's global RNG state is left untouched. ``trainable=False``
    (stage 2) returns a frozen tower in eval mode.
    """
    from llm2clip_scale.distributed.backend import collective_device
    from llm2clip_scale.distributed.cpu_compat import enable_cpu_compat
    from llm2clip_scale.models.llm.hf_import import init_seeded, load_hf_checkpoint

    enable_cpu_compat()  # inert when CUDA is present (build_topology has enabled it for a gloo run on a GPU node)
    if device is None:
        device = collective_device()  # the process group's device: a gloo run on a GPU node stays on the CPU
    # Every forward enters the model-parallel RNG tracker (attention dropout), so it must exist; respect a seeding
    # the training loop already did.
    if not get_cuda_rng_tracker().is_initialized():
        model_parallel_cuda_manual_seed(cfg.seed)
    config = llm_transformer_config(cfg, params_dtype, perform_initialization=False)
    tower = LLMTextEncoder(
        cfg,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if cfg.hf_checkpoint:
        load_hf_checkpoint(tower, cfg.hf_checkpoint)
    else:
        init_seeded(tower)
    if cfg.lora_init:
        from llm2clip_scale.checkpoint.lora import merge_stage1_lora

        merge_stage1_lora(tower, cfg.lora_init)
    tower = tower.to(device)
    if not trainable:
        tower.freeze()
    return tower
