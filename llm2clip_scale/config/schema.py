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
    # auto: Transformer Engine layers when the kernel registry finds TE on a GPU, else megatron's local spec.
    layer_spec: str = "auto"
    tokenizer: str = ""  # HF tokenizer directory
    hf_checkpoint: str | None = None  # HF Llama-family checkpoint directory to import
    seed: int = 1234  # init seed when no checkpoint is given (tiny CPU configs)
    # LoRA on the LLM (llm2clip_scale.models.llm.lora): trained in stage 1 (llm2clip_cc), and in stage 2 (online) when
    # > 0, on top of any lora_init; rank 0 trains no adapters. Stage 2 ignores lora_dropout (see train/stage2.py).
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    # How captions become token rows (data/prompts.py), in every stage and the offline sidecars: plain (the
    # tokenizer's own BOS/EOS, all pooled) or llm2vec (Llama-3 chat wrapper, pool caption + <|eot_id|> only), which
    # the released LLM2CLIP Llama-3 embedder was trained on and must be fed.
    caption_format: str = "plain"
    # A stage-1 (llm2clip_cc) LoRA merged into this tower when it is built: lora.safetensors, a step directory or a
    # checkpoint root with 'latest'. Chains LLM2CLIP stage 1 into stage 2, ProCLIP and offline embedding.
    lora_init: str | None = None
    # Prepended to stage-1 query captions and excluded from mean pooling (data/prompts.py); "" for none, "auto" for
    # one chosen by the pair's direction (short -> detailed caption or back, data/prompts.instruction_for).
    instruction: str = ""


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
    logit_bias_init: float | None = None  # SigLIP's learnable bias (init -10); None = no bias (InfoNCE)
    # ProCLIP stage 2 warm starts (llm2clip_scale.models.warm_start), applied in build_clip_model:
    # the stage-1 adapter (<stage-1 checkpoint.dir>/adapter.safetensors) ...
    adapter_init: str | None = None
    # ... and the pretrained CLIP image projection: head.weight/head.bias of a timm-format vision file (the trunk
    # loader drops them). Without it the stage-1 adapter's joint space would face a fresh, random image head.
    vision_head_init: str | None = None


@dataclass
class DatasetSource:
    """One training dataset of a weighted mix (``data.train_datasets``)."""

    shards: str = ""  # shard pattern or dataset index (.json)
    embedding_shards: str | None = None  # offline sidecars: a pattern (one per image shard, same order) or a folder
    caption_fields: dict[str, float] = field(default_factory=dict)  # empty: data.caption_fields
    weight: float = 1.0  # share of training samples, relative to the other datasets' weights
    name: str = ""  # for logs and per-dataset counts; default dataset<i>


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern, e.g. /data/cc/train-{000000..000099}.tar
    eval_shards: str | None = None
    # Offline mode: sidecar shards holding precomputed LLM embeddings (one per caption field, same keys as the
    # image shards, one sidecar per image shard in the same order). When set, no LLM is built in stage 2.
    train_embedding_shards: str | None = None
    eval_embedding_shards: str | None = None
    # Caption-field mixing: field name in the sample json -> sampling weight.
    caption_fields: dict[str, float] = field(default_factory=lambda: {"raw": 1.0})
    # Weighted mixing of several datasets, each with its own shards, sidecars and caption fields; when given, it
    # replaces train_shards/train_embedding_shards (leave those empty). Each sample comes from dataset i with
    # probability weight_i / sum(weights), whatever the datasets' sizes (all streams are resampled, endless).
    train_datasets: list[DatasetSource] = field(default_factory=list)
    eval_caption_field: str = "short"
    max_text_len: int = 128  # tokens per caption after truncation (LLM2CLIP uses up to 512)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Shards per shuffle block: each worker's stream is a sequence of blocks of this many resampled shards, shuffled
    # within the block; exact resume re-reads at most one block (without decoding images) to find its place.
    shuffle_block_shards: int = 4
    augment: str = "none"  # none | random_resized_crop
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])


def train_sources(data: DataConfig) -> list[DatasetSource]:
    """The training datasets as one list: ``data.train_datasets``, or the single ``data.train_shards`` dataset."""
    if data.train_datasets:
        return [
            DatasetSource(d.shards, d.embedding_shards, dict(d.caption_fields or data.caption_fields), d.weight,
                          d.name or f"dataset{i}")
            for i, d in enumerate(data.train_datasets)
        ]
    return [DatasetSource(data.train_shards, data.train_embedding_shards, dict(data.caption_fields), 1.0, "train")]


def trains_offline(data: DataConfig) -> bool:
    """Training reads sidecar embeddings (every dataset has them; the config check refuses a partial mix)."""
    return all(source.embedding_shards is not None for source in train_sources(data))


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 1
    # auto: nccl with CUDA, else gloo, except that a task assigned GPUs stops when CUDA is unusable (never a silent
    # CPU run: distributed/backend.py) | nccl (CUDA required) | gloo (CPU, also on a GPU node)
    backend: str = "auto"
    # A collective that waits longer than this raises on every rank (torch's default, 30 min, burns an allocation).
    collective_timeout_minutes: float = 10.0
    # A rank stuck this long in one phase of a step (data, step, loss all-reduce, eval, save) exits with an error
    # naming the rank, the phase and the innermost frame, so srun --kill-on-bad-exit ends the job; 0 = off.
    watchdog_seconds: float = 900.0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0  # the LLM LoRA (stage 1, stage 2 with model.llm.lora_rank > 0) is clipped by its own norm
    # Stage 2 with a trainable LLM LoRA (model.llm.lora_rank > 0): its lr (same AdamW settings and schedule shape);
    # None = optim.lr.
    llm_lora_lr: float | None = None


@dataclass
class TrainConfig:
    # llm2clip_cc: LLM2CLIP stage 1 (caption-contrastive LoRA tuning of the LLM); proclip_inherit: ProCLIP stage 1
    # (representation inheritance into the adapter); stage2: CLIP training against the frozen LLM (LLM2CLIP stage 2,
    # and ProCLIP stage 2 with self_distill_weight > 0).
    stage: str = "stage2"
    steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    global_batch: int = 1024  # samples per optimizer step over the whole world
    micro_batch: int = 64  # samples per rank per forward/backward
    precision: str = "bf16"  # fp32 | bf16
    loss: str = "infonce"  # infonce | infonce_tiled | siglip
    loss_tile_size: int = 1024  # local rows per tile for infonce_tiled (a tile x global-batch fp32 block)
    # ProCLIP stage 2: loss += self_distill_weight * [MSE + smoothL1(pdist)] against an EMA teacher of the image
    # encoder (0 = plain LLM2CLIP stage 2).
    self_distill_weight: float = 0.0
    # How both distillation terms reduce over the rank's rows / pairs: mean, or sum as the official ProCLIP code
    # (the mapping between the two: proclip.reduction, docs/RECIPES.md).
    self_distill_reduction: str = "mean"
    ema_momentum: float = 0.999
    seed: int = 0
    # auto: continue from the newest complete checkpoint under checkpoint.dir (start fresh when there is none);
    # none: always start fresh; or a checkpoint path (a step directory, or a checkpoint root with 'latest').
    resume: str = "auto"
    # A step whose loss or gradient is not finite is skipped (weights, optimizer and lr schedule untouched); this
    # many skipped steps in a row stop the run with an error, leaving the last good checkpoint as it is.
    max_consecutive_skipped_steps: int = 5


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    interval: int = 0  # steps between saves; 0 saves only at the end
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted after a newer one is committed); 0 = all
    async_save: bool = True  # write in a background thread while training continues (one save in flight at most)
    verify_on_load: bool = True  # check every file's size and sha256 against the manifest before resuming


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
    interval: int = 0  # steps between evaluations during training (0: only at the end); stage-specific metrics
    # Stage-2 eval tasks (docs/EVAL.md): long_retrieval (one caption per image: data.eval_shards, field data.
    # eval_caption_field; metrics r1_i2t, ... unprefixed as ever), retrieval (several captions per image, COCO
    # protocol), zeroshot (class names x templates), cra (caption 1 <-> caption 2 of an image, LLM embeddings).
    tasks: list[str] = field(default_factory=lambda: ["long_retrieval"])
    # Each task's data: webdataset shards, or a .jsonl/.csv with image paths beside it; empty: data.eval_shards.
    retrieval_data: str = ""
    zeroshot_data: str = ""
    cra_data: str = ""
    captions_field: str = "captions"  # json list of an image's captions (retrieval, cra); a string is one caption
    label_field: str = "label"  # json int: the zero-shot class index
    # json {"classes": [...], "templates": ["a photo of a {}.", ...]}; empty: zeroshot.json beside the zero-shot data
    zeroshot_classes: str = ""


@dataclass
class ProCLIPConfig:
    """ProCLIP stage 1 (train.stage=proclip_inherit): distil a frozen CLIP text encoder into the LLM adapter.

    Captions whose teacher tokenisation is longer than the teacher reads (its position table, capped by
    data.max_text_len) are never teacher views: they are dropped from the loss and counted in skipped_samples, since
    a truncated teacher would teach the adapter to ignore everything the LLM sees past the cut.
    """

    # HF CLIPTextModelWithProjection directory with its tokenizer (data_prep/train_reference_clip.py writes one
    # to <out>/text); its projection_dim must equal model.embed_dim.
    teacher_text: str = ""
    instance_weight: float = 1.0  # weight of L_ins = R_i ||norm(adapter(t'_i)) - norm(E_T(T_i))||^2, R: reduction
    structure_weight: float = 1.0  # weight of L_struct = smoothL1(pdist(student), pdist(teacher))
    # How L_ins and L_struct reduce over rows/pairs, and the views' losses over views: mean (per sample, per pair, per
    # view) or sum (the official ProCLIP code). With b rows per rank, sum = b * mean for L_ins and b(b-1)/2 * mean for
    # L_struct, so under sum the structure/instance ratio grows by (b-1)/2 and both weights act b times larger: the
    # official weights (1, 1) under sum equal instance_weight=b, structure_weight=b(b-1)/2 under mean
    # (docs/RECIPES.md).
    reduction: str = "mean"
    # Caption fields distilled per sample. Empty: one view, the caption drawn by data.caption_fields. Several (the
    # official recipe: [short, raw]): every sample is distilled on each field's caption, the per-view losses reduced
    # by `reduction`; every training sample must carry every field.
    views: list[str] = field(default_factory=list)
    # Views that also get L_struct (empty: all). The official code distils structure on the short captions only.
    structure_views: list[str] = field(default_factory=list)


@dataclass
class Stage1Config:
    """LLM2CLIP stage 1 (train.stage=llm2clip_cc): caption-contrastive LoRA fine-tuning of the LLM (supervised SimCSE).

    Training pairs come from data.train_shards (webdataset shards: two caption fields of one image; or .jsonl/.csv
    pair files); train.global_batch pairs per step over the LLM data-parallel group, embedded train.micro_batch
    pairs at a time with gradient caching.
    """

    temperature: float = 0.02  # SimCSE softmax temperature (LLM2Vec's scale 50)
    fields: list[str] = field(default_factory=lambda: ["short", "long"])  # caption fields two of which make a pair
    random_direction: bool = True  # which caption of a pair queries is random per pair (else fields order)
    hard_negatives: bool = True  # one hard negative per pair (a caption of another image)
    # How it is chosen among the captions of other images in the window: "mined" (most words shared with the
    # positive) or "random" (uniform; a random other image).
    negative_mode: str = "mined"
    negative_window: int = 16  # pairs around a pair that its hard negative is drawn from
    # LLM2Vec draws every batch from one dataset when it mixes several (in-batch negatives then are same-task
    # captions, not trivially told apart by style). True: each step's global batch comes from one source, a
    # ``::``-separated part of data.train_shards, drawn with probability proportional to its bytes on disk.
    one_source_per_batch: bool = False
    # Caption-retrieval accuracy (CRA) split: caption eval_fields[0] of each image queries all eval_fields[1]s.
    eval_pairs: str | None = None  # shards or pair files; None = no CRA
    eval_fields: list[str] = field(default_factory=lambda: ["short", "long"])
    # The CRA queries' instruction: "" (LLM2CLIP's protocol: caption 1 <-> caption 2 of one image, no prefix, so
    # numbers compare with the paper's), "auto" (as trained: chosen by the pair's direction) or a literal one.
    eval_instruction: str = ""
    # Optional MNTP pre-step (masked next-token prediction, LLM2Vec): steps of it before SimCSE; 0 = off. As in
    # LLM2Vec it trains its own LoRA (model.llm.lora_*), merged into the base before SimCSE's fresh LoRA starts;
    # checkpoints keep it (mntp_lora.safetensors) and their lora.safetensors is both LoRAs as one of rank 2r.
    mntp_steps: int = 0
    mntp_probability: float = 0.2  # share of caption tokens masked
    mntp_lr: float = 5.0e-5


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
    proclip: ProCLIPConfig = field(default_factory=ProCLIPConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
