"""The one typed configuration schema. Plain data: no behaviour beyond defaults.

YAML files under configs/ and dotted command-line overrides (``train.lr=1e-5``) are merged onto these dataclasses
by :mod:`llm2clip_scale.config.load`, which also validates them before any process group starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    image_size: int = 224
    # Extra timm constructor kwargs, e.g. {depth: 2, embed_dim: 64} for a tiny CPU tower.
    timm_kwargs: dict = field(default_factory=dict)
    pretrained_path: str | None = None  # local weights file (timm / open_clip / OpenAI format)
    pretrained_strict: bool = True  # missing/unexpected trunk keys are an error
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0  # fraction of patch tokens dropped in training (timm patch_drop_rate)
    lock: bool = False  # freeze the trunk (the fresh head still trains)
    lock_unlocked_groups: int = 0  # with lock: unfreeze the last N blocks (+ final norm / attention pool)
    lora_rank: int = 0  # > 0: LoRA on the trunk's attention linears, trunk frozen
    lora_alpha: float = 32.0
    layer_decay: float = 1.0  # layer-wise lr decay over trunk depth (1.0 = off)


@dataclass
class LLMConfig:
    """A Llama-architecture decoder used as a (bidirectional) text encoder."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_query_groups: int = 8
    ffn_hidden_size: int = 14336
    vocab_size: int = 128256
    max_seq_len: int = 512
    rotary_base: float = 500000.0
    norm_eps: float = 1e-5
    # Llama-3.1-style RoPE frequency scaling as in HF's rope_parameters (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); empty = plain RoPE. Llama 3.1/3.2 checkpoints need it.
    rope_scaling: dict[str, float] = field(default_factory=dict)
    qkv_bias: bool = False  # Qwen2-family checkpoints have biases on q/k/v
    bidirectional: bool = True
    tokenizer: str = ""  # HF tokenizer directory
    hf_checkpoint: str | None = None  # HF Llama-family checkpoint directory to import
    seed: int = 1234  # init seed when no checkpoint is given (tiny CPU configs)


@dataclass
class AdapterConfig:
    """LLM2CLIP adapter: L2-norm, N pre-LN residual MLP blocks, LayerNorm, Linear -> embed_dim."""

    input_dim: int = 4096  # must equal llm.hidden_size (online) or the sidecar embedding size (offline)
    num_blocks: int = 4
    expansion: int = 2  # hidden width of each residual MLP block = expansion * input_dim


@dataclass
class ModelConfig:
    embed_dim: int = 1280
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern, e.g. /data/cc/train-{000000..000099}.tar
    eval_shards: str | None = None
    # Caption-field mixing: field name in the sample json -> sampling weight.
    caption_fields: dict[str, float] = field(default_factory=lambda: {"raw": 1.0})
    eval_caption_field: str = "short"
    max_text_len: int = 128  # tokens per caption after truncation (LLM2CLIP uses up to 512)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    augment: str = "none"  # none | random_resized_crop
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 1
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    stage: str = "stage2"
    steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    global_batch: int = 1024  # samples per optimizer step over the whole world
    micro_batch: int = 64  # samples per rank per forward/backward
    precision: str = "bf16"  # fp32 | bf16
    seed: int = 0


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    interval: int = 0  # steps between saves; 0 saves only at the end


@dataclass
class LoggingConfig:
    dir: str = "runs"
    interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class EvalConfig:
    max_samples: int = 1000
    batch_size: int = 64  # per rank


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
