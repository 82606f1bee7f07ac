"""The LLM text tower: a Llama-architecture megatron-core encoder that returns mean-pooled caption embeddings.

It composes megatron's vocab-parallel LanguageModelEmbedding, RotaryEmbedding and TransformerBlock instead of
using GPTModel: an embedder has no use for the LM head, which alone is 0.5B parameters for Llama-3-8B.
Tensor parallelism comes from megatron's TP group (set up by ``build_topology``). Pipeline stages are expressed
the way GPTModel does it (``pre_process`` owns the embedding, ``post_process`` the final norm and pooling, and
``set_input_tensor`` feeds middle stages) so PP can be switched on later; today only PP=1 is exercised.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from llm2clip_scale.config.schema import LLMConfig


def llm_transformer_config(cfg: LLMConfig, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron TransformerConfig of a Llama-family model (RMSNorm, SwiGLU, RoPE, GQA, no biases, no dropout)."""
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
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Master weights are drawn whole on CPU from one seeded stream and sliced per TP rank, so every TP size
        # builds the same function; the on-device path seeds each TP rank differently.
        use_cpu_initialization=True,
        # The fused kernels below need apex / TE / CUDA extensions, which are optional GPU-only extras.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def _layer_spec() -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    # "padding" makes the softmax always honour our explicit mask; with "causal" megatron's fused CUDA kernel would
    # apply its own triangle and ignore the mask, i.e. attend to padding and never be bidirectional.
    spec.submodules.self_attention = dataclasses.replace(
        attention, params={**attention.params, "attn_mask_type": AttnMaskType.padding}
    )
    return spec


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
            use_cpu_initialization=config.use_cpu_initialization,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=_layer_spec(),
            post_layer_norm=True,
            pre_process=pre_process,
            post_process=post_process,
        )

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Pipeline hook: a non-first stage receives the previous stage's hidden states here."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def build_attention_mask(self, attention_mask: Tensor) -> Tensor:
        """(b, L) 1=token/0=pad -> (b, 1, L, L) bool, True = may NOT attend (megatron convention).

        Keys that are padding are always masked; with causal attention the future is masked too. Pad *queries*
        keep their rows unmasked so that no softmax row is empty (they never reach the pooled output).
        """
        keep = attention_mask.bool()
        length = keep.shape[1]
        masked = ~keep[:, None, None, :]  # (b, 1, 1, L): masked keys
        if not self.bidirectional:
            future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=keep.device), diagonal=1)
            masked = masked | future
        return masked.expand(-1, 1, length, length)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor | None = None) -> Tensor:
        """Embed right-padded captions.

        ``pool_mask`` (b, L), defaulting to ``attention_mask``, selects which tokens are averaged; LLM2CLIP
        excludes instruction tokens from the mean while still letting captions attend to them. Returns
        (b, hidden) float32 on the last pipeline stage, and the stage's (L, b, hidden) activations elsewhere.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected input_ids and attention_mask of one (b, L) shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        length = input_ids.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len {self.cfg.max_seq_len}")
        mask = self.build_attention_mask(attention_mask)
        # RoPE positions are 0..L-1 for every row, which is why captions must be right-padded.
        rotary_pos_emb = self.rotary_pos_emb(length)
        hidden = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary_pos_emb)
        if not self.post_process:
            return hidden
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
    """Build this rank's TP/PP shard of the tower with weights drawn from ``cfg.seed``.

    Requires megatron parallel_state (``build_topology``). The weights do not depend on the TP size: each
    parallel weight is drawn whole from a CPU generator seeded with ``cfg.seed`` and sliced (megatron's
    master-weight init), so TP=1 and TP=2 shards are pieces of the same matrices. The caller's global RNG state is
    left untouched. ``trainable=False`` (stage 2) returns a frozen tower in eval mode.
    """
    from llm2clip_scale.distributed.cpu_compat import enable_cpu_compat

    enable_cpu_compat()  # inert when CUDA is present
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    # Every forward enters the model-parallel RNG tracker (attention dropout), so it must exist; respect a seeding
    # the training loop already did.
    if not get_cuda_rng_tracker().is_initialized():
        model_parallel_cuda_manual_seed(cfg.seed)
    config = llm_transformer_config(cfg, params_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = LLMTextEncoder(
            cfg,
            config,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    tower = tower.to(device)
    if not trainable:
        tower.freeze()
    return tower
