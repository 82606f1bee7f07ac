"""Load a YAML config onto the typed schema, apply dotted overrides, validate before any process group starts."""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import braceexpand
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm2clip_scale.config.schema import Config, DataConfig, train_sources, trains_offline
from llm2clip_scale.data.index import DatasetIndexError, index_urls, is_index

# Mirrors llm2clip_scale.losses.LOSS_NAMES (config stays free of torch imports; tests/test_config.py checks they agree).
LOSS_NAMES = ("infonce", "infonce_tiled", "siglip")
# Stages llm2clip_scale.train.run_training dispatches on.
STAGES = ("llm2clip_cc", "proclip_inherit", "stage2")
# Earlier names of the two "stage 1"s, refused with the new name so old configs fail with a fix, not a guess.
RENAMED_STAGES = {"stage1_cc": "llm2clip_cc", "proclip_stage1": "proclip_inherit"}


# Map-valued fields whose schema default is not empty: a YAML file or a ``key={...}`` override that gives one of them
# replaces it whole; a dotted override of one entry (``data.caption_fields.raw=0.2``) still edits it in place.
MAP_FIELDS = ("data.caption_fields",)


class ConfigError(ValueError):
    """A configuration problem, phrased as 'field: what is wrong; how to fix it'."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge ``path`` (YAML) and ``overrides`` (``a.b=value``) onto the schema; raise ConfigError naming the field."""
    layers = []  # (layer, the map fields it gives whole)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!s} does not exist")
        layer = OmegaConf.load(path)
        layers.append((layer, [key for key in MAP_FIELDS if OmegaConf.select(layer, key) is not None]))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.lr=1e-5")
        key = item.split("=", 1)[0].strip()
        layers.append((OmegaConf.from_dotlist([item]), [key] if key in MAP_FIELDS else []))
    try:
        merged = OmegaConf.structured(Config)
        for layer, whole_maps in layers:
            # A map given whole replaces the one below instead of merging into it: a config's
            # caption_fields {short: 0.5, long: 0.5} must not keep the schema's default raw: 1.0 beside them.
            for key in whole_maps:
                OmegaConf.update(merged, key, {}, merge=False)
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None
    assert isinstance(cfg, Config)
    return cfg


def _describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    message = str(err).splitlines()[0]
    if "not in" in message or "Key '" in message and "not" in message:
        return f"{key}: unknown key ({message}); check the spelling against llm2clip_scale/config/schema.py"
    return f"{key}: {message}; give a value of the type declared in llm2clip_scale/config/schema.py"


def world_size_from_env() -> int:
    """The world size a launcher announces before init: torchrun's WORLD_SIZE or Slurm's SLURM_NTASKS."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def expand_shards(pattern: str) -> list[str]:
    """Brace- and glob-expand a shard pattern (``::`` separates several patterns; a ``.json`` part is a dataset
    index, whose shards are listed in it)."""
    urls: list[str] = []
    for part in pattern.split("::"):
        if is_index(part):  # a dataset index lists its shards (data/index.py): no expansion of 100k names
            urls.extend(index_urls(part))
            continue
        for item in braceexpand.braceexpand(part):
            urls.extend(sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item])
    return urls


def _missing_files(field: str, pattern: str, fix: str) -> list[str]:
    """A problem line when ``pattern`` expands to nothing or names files that do not exist, else nothing."""
    try:
        urls = expand_shards(pattern)
    except DatasetIndexError as err:
        return [f"{field}: {err}"]
    if urls and all(is_index(part) for part in pattern.split("::")):
        # An index is written last by the builder, so its shards exist; a stat of 100k files on a cluster
        # filesystem costs minutes. Check the ends only (a dataset moved without its shards).
        missing = [url for url in dict.fromkeys([urls[0], urls[-1]]) if not Path(url).is_file()]
        if missing:
            return [f"{field}: {missing[0]} listed by the index is missing (the first and last of its {len(urls)} "
                    f"shards are checked); {fix}"]
        return []
    missing = [url for url in urls if not Path(url).is_file()]
    if urls and not missing:
        return []
    return [f"{field}: {len(missing)} of {len(urls)} file(s) missing, first {(missing or [pattern])[0]}; {fix}"]


def layout_problems(cfg: Config, world: int) -> list[str]:
    """The rules tying the parallel layout, the batch and the precision to ``world`` ranks: what :func:`validate` and
    ``llm2clip-scale plan`` (planning a cluster from a machine without its files) both check."""
    problems: list[str] = []
    par, train = cfg.parallel, cfg.train
    if par.tensor_parallel < 1 or par.pipeline_parallel < 1:
        problems.append("parallel.tensor_parallel/pipeline_parallel: must be >= 1")
    elif world % (par.tensor_parallel * par.pipeline_parallel) != 0:
        problems.append(
            f"parallel: tensor_parallel ({par.tensor_parallel}) x pipeline_parallel ({par.pipeline_parallel}) = "
            f"{par.tensor_parallel * par.pipeline_parallel} does not divide the world size {world}; "
            "pick TP and PP whose product divides the number of ranks"
        )
    if par.pipeline_parallel > 1 and cfg.model.llm.num_layers % par.pipeline_parallel:
        problems.append(
            f"parallel.pipeline_parallel: {par.pipeline_parallel} must divide model.llm.num_layers "
            f"({cfg.model.llm.num_layers}); megatron splits the layers evenly over the stages"
        )
    if par.zero_stage not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage: {par.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    if train.micro_batch < 1 or train.global_batch < 1:
        problems.append("train.micro_batch/global_batch: must be >= 1")
    elif train.stage == "llm2clip_cc":
        # Megatron layout: pairs split over LLM data parallelism only; TP/PP ranks of a group share the batch.
        dp = max(world // max(par.tensor_parallel * par.pipeline_parallel, 1), 1)
        if train.global_batch % (train.micro_batch * dp) != 0:
            problems.append(
                f"train.global_batch: {train.global_batch} pairs is not a multiple of micro_batch ({train.micro_batch})"
                f" x LLM data-parallel size ({dp}); stage 1 embeds micro_batch pairs at a time per model replica"
            )
    elif train.global_batch % (train.micro_batch * world) != 0:
        problems.append(
            f"train.global_batch: {train.global_batch} is not a multiple of micro_batch ({train.micro_batch}) x "
            f"world size ({world}) = {train.micro_batch * world}; set global_batch to a multiple of it"
        )
    if train.precision not in ("fp32", "bf16"):
        problems.append(f"train.precision: {train.precision!r} unsupported; use fp32 or bf16 (fp16 is not offered)")
    return problems


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check the rules that span fields. Raises ConfigError listing every problem found."""
    world = world_size if world_size is not None else world_size_from_env()
    problems: list[str] = []
    par, train, model, data = cfg.parallel, cfg.train, cfg.model, cfg.data

    problems.extend(layout_problems(cfg, world))
    if par.backend not in ("auto", "nccl", "gloo"):
        problems.append(f"parallel.backend: {par.backend!r} unknown; use auto, nccl or gloo")
    if par.collective_timeout_minutes <= 0:
        problems.append(f"parallel.collective_timeout_minutes: {par.collective_timeout_minutes} must be > 0 (e.g. 10)")
    if par.watchdog_seconds < 0:
        problems.append(f"parallel.watchdog_seconds: {par.watchdog_seconds} must be >= 0 (0 turns the watchdog off)")

    if train.stage in RENAMED_STAGES:
        problems.append(f"train.stage: {train.stage!r} was renamed; use {RENAMED_STAGES[train.stage]!r}")
    elif train.stage not in STAGES:
        problems.append(f"train.stage: {train.stage!r} unknown; use one of {', '.join(STAGES)}")
    if train.loss not in LOSS_NAMES:
        problems.append(f"train.loss: {train.loss!r} unknown; use one of {', '.join(LOSS_NAMES)}")
    elif (train.loss == "siglip") != (model.logit_bias_init is not None):
        problems.append(
            "model.logit_bias_init: the siglip loss needs a learnable bias (set logit_bias_init, e.g. -10) and the "
            "InfoNCE losses take none (leave it null)"
        )
    if train.self_distill_weight > 0 and par.zero_stage == 3:
        problems.append(
            "train.self_distill_weight: the EMA teacher reads the student's full weights, which ZeRO-3 partitions; "
            "use parallel.zero_stage <= 2 for ProCLIP stage 2"
        )
    if train.self_distill_reduction not in ("mean", "sum"):
        problems.append(f"train.self_distill_reduction: {train.self_distill_reduction!r} unknown; use mean or sum")
    if not 0.0 <= train.ema_momentum < 1.0:
        problems.append(f"train.ema_momentum: {train.ema_momentum} must lie in [0, 1)")
    if train.steps < 1:
        problems.append("train.steps: must be >= 1")
    if not 0 <= train.warmup_steps <= train.steps:
        problems.append(f"train.warmup_steps: {train.warmup_steps} must lie in [0, train.steps={train.steps}]")

    if model.adapter.input_dim != model.llm.hidden_size:
        problems.append(
            f"model.adapter.input_dim: {model.adapter.input_dim} != model.llm.hidden_size {model.llm.hidden_size}; "
            "the adapter consumes the LLM's pooled embedding, so set them equal"
        )
    problems.extend(_llm_shape_problems(cfg))
    llm = model.llm
    offline_train = trains_offline(data)
    needs_tokenizer = not offline_train or (bool(data.eval_shards) and data.eval_embedding_shards is None)
    if not llm.tokenizer:
        if needs_tokenizer:
            problems.append("model.llm.tokenizer: empty; point it at a HuggingFace tokenizer directory (online mode)")
    elif not Path(llm.tokenizer).is_dir():
        problems.append(f"model.llm.tokenizer: {llm.tokenizer} is not a directory; create it or fix the path")
    if llm.hf_checkpoint is not None and not Path(llm.hf_checkpoint).is_dir():
        problems.append(f"model.llm.hf_checkpoint: {llm.hf_checkpoint} is not a directory; point it at the "
                        "HuggingFace checkpoint directory (config.json + safetensors) or set it to null")
    problems.extend(_text_input_problems(cfg))

    if model.vision.pretrained_path is not None and not Path(model.vision.pretrained_path).is_file():
        problems.append(f"model.vision.pretrained_path: {model.vision.pretrained_path} is not a file; fix the path "
                        "or set it to null for a random init")
    for name in ("adapter_init", "vision_head_init"):
        value = getattr(model, name)
        if value is not None and not Path(value).is_file():
            problems.append(f"model.{name}: {value} is not a file; run the step that writes it first")
    if train.stage == "proclip_inherit":
        teacher = cfg.proclip.teacher_text
        if not teacher or not (Path(teacher) / "config.json").is_file():
            problems.append(
                f"proclip.teacher_text: {teacher!r} is not a HuggingFace CLIP text model directory; train one with "
                "python data_prep/train_reference_clip.py (it writes <out>/text) or point it at a CLIP export"
            )
        if cfg.proclip.instance_weight < 0 or cfg.proclip.structure_weight < 0 or (
            cfg.proclip.instance_weight == 0 and cfg.proclip.structure_weight == 0
        ):
            problems.append("proclip.instance_weight/structure_weight: must be >= 0 and not both 0")
        problems += _proclip_view_problems(cfg)
        if par.zero_stage == 3:
            problems.append(
                "parallel.zero_stage: ProCLIP stage 1 saves the adapter from each rank's full weights, which ZeRO-3 "
                "partitions; use zero_stage <= 2 (the adapter is small)"
            )

    if train.stage == "llm2clip_cc":
        problems.extend(_stage1_problems(cfg))
    problems.extend(_run_problems(cfg))

    problems.extend(_train_data_problems(data))
    if data.eval_shards:
        problems += _missing_files("data.eval_shards", data.eval_shards, "fix the pattern")
    if data.eval_embedding_shards is not None:
        problems += _sidecar_problems("data.eval_embedding_shards", data.eval_embedding_shards)
    if data.augment not in ("none", "random_resized_crop"):
        problems.append(f"data.augment: {data.augment!r} unknown; use none or random_resized_crop")
    if len(data.image_mean) != 3 or len(data.image_std) != 3:
        problems.append("data.image_mean/image_std: give 3 values (RGB)")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas: give two values, got {cfg.optim.betas}")
    from llm2clip_scale.eval.task_config import eval_task_problems  # eval/ imports config: resolved lazily

    problems.extend(eval_task_problems(cfg))

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


EMBED_HINT = "write them with data_prep/embed_captions.py"


def _proclip_view_problems(cfg: Config) -> list[str]:
    proclip, problems = cfg.proclip, []
    if proclip.reduction not in ("mean", "sum"):  # mirrors llm2clip_scale.losses.proclip.REDUCTIONS
        problems.append(f"proclip.reduction: {proclip.reduction!r} unknown; use mean or sum")
    if len(set(proclip.views)) != len(proclip.views):
        problems.append(f"proclip.views: {proclip.views} names a field twice")
    if proclip.structure_views and not set(proclip.structure_views) <= set(proclip.views):
        problems.append(f"proclip.structure_views: {proclip.structure_views} must be a subset of proclip.views "
                        f"({proclip.views}; empty = every view)")
    return problems


def _sidecar_problems(where: str, pattern: str) -> list[str]:
    # A folder means "the sidecar of each image shard by its file name" (data/shards.py: paired_shard_list); the
    # loader then names any that is missing, as for a pattern.
    return [] if Path(pattern).is_dir() else _missing_files(where, pattern, EMBED_HINT)


def _caption_weight_problems(where: str, weights: dict[str, float]) -> list[str]:
    if not weights or any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        return [f"{where}: give at least one field with a positive weight, e.g. {{raw: 1.0}}"]
    return []


def _train_data_problems(data: DataConfig) -> list[str]:
    """Training shards, sidecars and caption fields: of data.train_shards, or of each data.train_datasets entry."""
    build_hint = "fix the pattern or build the shards (data_prep/build_shards.py; make_synthetic.py for the demo)"
    problems = _caption_weight_problems("data.caption_fields", data.caption_fields)
    if not data.train_datasets:
        if not data.train_shards:
            return problems + ["data.train_shards: empty; give a shard pattern like /data/train-{000000..000009}.tar "
                               "or a dataset index /data/cc/index.json (or list data.train_datasets)"]
        problems += _missing_files("data.train_shards", data.train_shards, build_hint)
        if data.train_embedding_shards is not None:
            problems += _sidecar_problems("data.train_embedding_shards", data.train_embedding_shards)
        return problems
    if data.train_shards or data.train_embedding_shards is not None:
        problems.append("data.train_shards/train_embedding_shards: set, but data.train_datasets is given too; move "
                        "them into a train_datasets entry (shards, embedding_shards) and leave them empty")
    names = [source.name for source in train_sources(data)]
    for i, given in enumerate(data.train_datasets):
        where = f"data.train_datasets[{i}]"
        if not given.shards:
            problems.append(f"{where}.shards: empty; give a shard pattern or a dataset index (.json)")
        else:
            problems += _missing_files(f"{where}.shards", given.shards, build_hint)
        if given.embedding_shards is not None:
            problems += _sidecar_problems(f"{where}.embedding_shards", given.embedding_shards)
        if given.caption_fields:
            problems += _caption_weight_problems(f"{where}.caption_fields", given.caption_fields)
        if not given.weight > 0 or not math.isfinite(given.weight):
            problems.append(f"{where}.weight: {given.weight} must be a positive number (its share of samples)")
    if len(set(names)) != len(names):
        problems.append(f"data.train_datasets: names {names} repeat; give each dataset its own name")
    offline = [source.embedding_shards is not None for source in data.train_datasets]
    if any(offline) and not all(offline):
        problems.append("data.train_datasets: some datasets give embedding_shards and some do not; a batch is "
                        "either all precomputed (offline) or all tokenised (online) — embed the others with "
                        "data_prep/embed_captions.py or drop their embedding_shards")
    return problems


def _llm_shape_problems(cfg: Config) -> list[str]:
    """The LLM's head layout and how megatron's tensor parallelism splits it (checked without dividing by zero)."""
    llm, tp, problems = cfg.model.llm, cfg.parallel.tensor_parallel, []
    if llm.num_attention_heads < 1 or llm.num_query_groups < 1:
        return ["model.llm.num_attention_heads/num_query_groups: must be >= 1 (Llama-3-8B: 32 heads, 8 groups)"]
    if llm.hidden_size % llm.num_attention_heads or llm.num_attention_heads % llm.num_query_groups:
        problems.append(
            "model.llm: hidden_size must be divisible by num_attention_heads, and num_attention_heads by "
            "num_query_groups"
        )
    elif tp >= 1 and (llm.num_query_groups % tp or llm.num_attention_heads % tp):
        problems.append(
            f"parallel.tensor_parallel: {tp} must divide model.llm.num_attention_heads "
            f"({llm.num_attention_heads}) and num_query_groups ({llm.num_query_groups})"
        )
    if tp >= 1 and (llm.ffn_hidden_size % tp or llm.vocab_size % tp):
        problems.append(
            f"parallel.tensor_parallel: {tp} must divide model.llm.ffn_hidden_size ({llm.ffn_hidden_size}) and "
            f"vocab_size ({llm.vocab_size}); megatron splits the MLP and the embedding table evenly over the TP ranks "
            "(pad vocab_size up to a multiple of TP)"
        )
    return problems


def _run_problems(cfg: Config) -> list[str]:
    """Checkpointing, resume, evaluation cadence and the loader's shuffle blocks."""
    problems: list[str] = []
    ckpt, train = cfg.checkpoint, cfg.train
    if not ckpt.dir:
        problems.append("checkpoint.dir: empty; give the directory checkpoints are written to and resumed from")
    if ckpt.interval < 0:
        problems.append("checkpoint.interval: must be >= 0 (0 saves only at the end)")
    if ckpt.keep_last < 0:
        problems.append("checkpoint.keep_last: must be >= 0 (0 keeps every checkpoint)")
    if cfg.eval.interval < 0:
        problems.append("eval.interval: must be >= 0 (0 evaluates only at the end)")
    if train.max_consecutive_skipped_steps < 1:
        problems.append("train.max_consecutive_skipped_steps: must be >= 1")
    if cfg.data.shuffle_block_shards < 1:
        problems.append("data.shuffle_block_shards: must be >= 1")
    if train.resume not in ("auto", "none") and not Path(train.resume).is_dir():
        problems.append(
            f"train.resume: {train.resume!r} is neither auto, none, nor an existing checkpoint directory; "
            "give a step directory (…/step1000) or a checkpoint root holding 'latest'"
        )
    return problems


def _text_input_problems(cfg: Config) -> list[str]:
    """model.llm.caption_format, lora_init and lora_rank outside stage 1: checked here, not at the first batch."""
    from llm2clip_scale.data.prompts import CAPTION_FORMATS

    llm, problems = cfg.model.llm, []
    if llm.caption_format not in CAPTION_FORMATS:
        problems.append(f"model.llm.caption_format: {llm.caption_format!r} unknown; use {' or '.join(CAPTION_FORMATS)}")
    elif llm.caption_format == "llm2vec" and llm.tokenizer and Path(llm.tokenizer).is_dir():
        from llm2clip_scale.data.prompts import check_llm2vec_tokenizer
        from llm2clip_scale.data.samples import load_tokenizer

        try:
            tokenizer = load_tokenizer(llm.tokenizer)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"model.llm.tokenizer: {llm.tokenizer} does not load as a HuggingFace tokenizer "
                            f"({first_line}); point it at the LLM's tokenizer directory")
        else:
            try:
                check_llm2vec_tokenizer(tokenizer)
            except ValueError as err:
                problems.append(str(err))
    if llm.lora_rank > 0 and cfg.train.stage == "stage2" and trains_offline(cfg.data):
        problems.append("model.llm.lora_rank: a trainable LLM LoRA needs the LLM in the loop; offline mode "
                        "(data.train_embedding_shards) reads fixed embeddings — train online or set lora_rank=0")
    if llm.lora_rank > 0 and cfg.train.stage == "proclip_inherit":
        problems.append("model.llm.lora_rank: ProCLIP stage 1 trains the adapter only; set lora_rank=0 (or chain a "
                        "stage-1 LoRA with model.llm.lora_init)")
    if llm.layer_spec not in ("auto", "local", "transformer_engine"):
        problems.append(f"model.llm.layer_spec: {llm.layer_spec!r} unknown; use auto, local or transformer_engine")
    elif llm.layer_spec == "transformer_engine" and (llm.lora_rank > 0 or llm.lora_init):
        problems.append("model.llm.layer_spec: transformer_engine fuses the input norm into the linears LoRA adapts "
                        "(lora_rank / lora_init are set); use local, or auto, which picks local for a LoRA tower")
    if cfg.optim.llm_lora_lr is not None and cfg.optim.llm_lora_lr <= 0:
        problems.append(f"optim.llm_lora_lr: {cfg.optim.llm_lora_lr} must be > 0 (or null for optim.lr)")
    if llm.lora_init is not None:
        from llm2clip_scale.checkpoint.layout import ADAPTER_CONFIG_FILE, resolve_lora_path

        if cfg.train.stage == "llm2clip_cc":
            problems.append("model.llm.lora_init: stage 1 trains its own LoRA; lora_init merges a finished stage 1 "
                            "into stage 2, ProCLIP or offline embedding — remove it here")
        try:
            lora_file = resolve_lora_path(llm.lora_init)
            if not lora_file.is_file() or not lora_file.with_name(ADAPTER_CONFIG_FILE).is_file():
                problems.append(f"model.llm.lora_init: {lora_file} or its {ADAPTER_CONFIG_FILE} is missing; point "
                                "it at a complete stage-1 checkpoint (root, step directory or lora.safetensors)")
        except FileNotFoundError as err:
            problems.append(f"model.llm.lora_init: {err}")
    return problems


def _stage1_problems(cfg: Config) -> list[str]:
    """Rules of LLM2CLIP stage 1 (train.stage=llm2clip_cc)."""
    problems: list[str] = []
    s1, llm = cfg.stage1, cfg.model.llm
    if llm.lora_rank < 1:
        problems.append("model.llm.lora_rank: stage 1 trains LoRA adapters only; set it >= 1 (LLM2CLIP uses 16)")
    if not 0.0 <= llm.lora_dropout < 1.0:
        problems.append(f"model.llm.lora_dropout: {llm.lora_dropout} must lie in [0, 1)")
    if s1.temperature <= 0:
        problems.append(f"stage1.temperature: {s1.temperature} must be > 0 (LLM2CLIP uses 0.02)")
    for name in ("fields", "eval_fields"):
        value = getattr(s1, name)
        if len(set(value)) < 2:
            problems.append(f"stage1.{name}: {value} needs two distinct caption fields (query, positive)")
    if s1.negative_window < 2:
        problems.append(f"stage1.negative_window: {s1.negative_window} must be >= 2")
    if s1.negative_mode not in ("mined", "random"):
        problems.append(f"stage1.negative_mode: {s1.negative_mode!r} must be mined or random")
    if s1.eval_pairs:
        problems += _missing_files("stage1.eval_pairs", s1.eval_pairs, "fix the pattern")
    if s1.mntp_steps < 0:
        problems.append("stage1.mntp_steps: must be >= 0")
    if not 0.0 < s1.mntp_probability < 1.0:
        problems.append(f"stage1.mntp_probability: {s1.mntp_probability} must lie in (0, 1)")
    if s1.mntp_lr <= 0:
        problems.append("stage1.mntp_lr: must be > 0")
    return problems
