"""Config loading and validation: every rule names the field and the fix."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from llm2clip_scale.cli import main as cli_main
from llm2clip_scale.config import ConfigError, load_config, validate
from llm2clip_scale.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """Overrides pointing the tiny config at shard files and a tokenizer directory that exist."""
    for name in ("train-000000.tar", "train-000001.tar", "eval-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "tok").mkdir()
    return [
        f"data.train_shards={tmp_path}/train-{{000000..000001}}.tar",
        f"data.eval_shards={tmp_path}/eval-000000.tar",
        f"model.llm.tokenizer={tmp_path}/tok",
    ]


def _problems(overrides: list[str], world_size: int = 2) -> str:
    with pytest.raises(ConfigError) as info:
        validate(load_config(TINY, overrides), world_size)
    return str(info.value)


def test_tiny_config_is_valid(paths: list[str]) -> None:
    cfg = load_config(TINY, [*paths, "optim.lr=3e-4"])
    validate(cfg, world_size=2)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.vision.timm_kwargs["depth"] == 4


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(config: Path) -> None:
    load_config(config)


def test_unknown_key_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrate: unknown key"):
        load_config(TINY, ["train.lrate=1e-5"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  vision:\n    nmae: vit_base_patch16_224\n")
    with pytest.raises(ConfigError, match=r"model\.vision\.nmae: unknown key"):
        load_config(bad)


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: .*could not be converted to Integer"):
        load_config(TINY, ["train.steps=many"])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(TINY, ["train.steps"])


def test_tp_pp_must_divide_world(paths: list[str]) -> None:
    message = _problems([*paths, "parallel.tensor_parallel=2"], world_size=3)
    assert "tensor_parallel (2) x pipeline_parallel (1) = 2 does not divide the world size 3" in message


def test_micro_batch_must_divide_global_batch(paths: list[str]) -> None:
    message = _problems([*paths, "train.global_batch=96", "train.micro_batch=32"], world_size=2)
    assert "train.global_batch: 96 is not a multiple of micro_batch (32) x world size (2) = 64" in message


def test_missing_data_paths(tmp_path: Path, paths: list[str]) -> None:
    message = _problems([*paths, f"data.train_shards={tmp_path}/nope-{{0..2}}.tar"])
    assert "data.train_shards: 3 of 3 file(s) missing" in message
    message = _problems([*paths, f"model.llm.tokenizer={tmp_path}/nope"])
    assert "model.llm.tokenizer:" in message and "is not a directory" in message
    message = _problems([*paths, f"data.train_embedding_shards={tmp_path}/emb-{{0..1}}.tar"])
    assert "data.train_embedding_shards: 2 of 2 file(s) missing" in message and "embed_captions.py" in message


def test_adapter_input_must_match_llm_hidden(paths: list[str]) -> None:
    message = _problems([*paths, "model.adapter.input_dim=64"])
    assert "model.adapter.input_dim: 64 != model.llm.hidden_size 128" in message


def test_all_problems_reported_at_once(paths: list[str]) -> None:
    message = _problems([*paths, "model.adapter.input_dim=64", "train.global_batch=7"], world_size=2)
    assert "model.adapter.input_dim" in message and "train.global_batch" in message


def test_cli_validate_reports_error_exit_code(paths: list[str], capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["validate", str(TINY), "--world-size", "2", *paths]) == 0
    assert cli_main(["validate", str(TINY), "--world-size", "2", *paths, "model.adapter.input_dim=1"]) == 2
    assert "model.adapter.input_dim: 1" in capsys.readouterr().err


def test_loss_names_agree_with_the_losses_package() -> None:
    from llm2clip_scale.config.load import LOSS_NAMES as CONFIG_NAMES
    from llm2clip_scale.losses import LOSS_NAMES

    assert CONFIG_NAMES == LOSS_NAMES


def test_siglip_needs_a_bias_and_infonce_none(paths: list[str]) -> None:
    assert "model.logit_bias_init" in _problems([*paths, "train.loss=siglip"])
    assert "model.logit_bias_init" in _problems([*paths, "model.logit_bias_init=-10"])
    validate(load_config(TINY, [*paths, "train.loss=siglip", "model.logit_bias_init=-10"]), 2)
    assert "train.loss: 'hinge' unknown" in _problems([*paths, "train.loss=hinge"])


# ------------------------------------------------------------------------------------------ one row per rule
# Every rule of llm2clip_scale/config/load.py, each triggered alone on a config that is otherwise valid: exactly one
# problem comes back, naming the field and the fix. ``{d}`` is a directory of stand-in files (the ``files`` fixture).
BASES = {
    "tiny": (TINY, ["data.train_shards={d}/train-{{000000..000001}}.tar", "data.eval_shards={d}/eval-000000.tar",
                    "model.llm.tokenizer={d}/tok"]),
    "cc": (REPO / "configs" / "llm2clip_cc_tiny.yaml",
           ["data.train_shards={d}/train-{{000000..000001}}.tar", "model.llm.tokenizer={d}/tok",
            "stage1.eval_pairs={d}/eval-000000.tar"]),
    "inherit": (REPO / "configs" / "proclip_inherit_tiny.yaml",
                ["data.train_shards={d}/train-{{000000..000001}}.tar", "data.eval_shards={d}/eval-000000.tar",
                 "model.llm.tokenizer={d}/tok", "proclip.teacher_text={d}/teacher"]),
}

RULES = [
    # parallel layout
    ("tp_below_one", "tiny", ["parallel.tensor_parallel=0"], 2,
     "parallel.tensor_parallel/pipeline_parallel: must be >= 1"),
    ("pp_below_one", "tiny", ["parallel.pipeline_parallel=0"], 2,
     "parallel.tensor_parallel/pipeline_parallel: must be >= 1"),
    ("tp_pp_not_dividing_world", "tiny", ["parallel.tensor_parallel=2", "train.global_batch=96"], 3,
     "parallel: tensor_parallel (2) x pipeline_parallel (1) = 2 does not divide the world size 3; pick TP and PP "
     "whose product divides the number of ranks"),
    ("pp_not_dividing_layers", "tiny", ["parallel.pipeline_parallel=2", "model.llm.num_layers=3"], 2,
     "parallel.pipeline_parallel: 2 must divide model.llm.num_layers (3); megatron splits the layers evenly"),
    ("tp_not_dividing_query_groups", "tiny", ["parallel.tensor_parallel=4", "train.global_batch=128"], 4,
     "parallel.tensor_parallel: 4 must divide model.llm.num_attention_heads (4) and num_query_groups (2)"),
    ("tp_not_dividing_heads", "tiny", ["parallel.tensor_parallel=3", "train.global_batch=96",
                                       "model.llm.ffn_hidden_size=258", "model.llm.vocab_size=258"], 3,
     "parallel.tensor_parallel: 3 must divide model.llm.num_attention_heads (4) and num_query_groups (2)"),
    ("tp_not_dividing_ffn", "tiny", ["parallel.tensor_parallel=2", "model.llm.ffn_hidden_size=255"], 2,
     "parallel.tensor_parallel: 2 must divide model.llm.ffn_hidden_size (255) and vocab_size (256); megatron "
     "splits the MLP and the embedding table evenly over the TP ranks"),
    ("tp_not_dividing_vocab", "tiny", ["parallel.tensor_parallel=2", "model.llm.vocab_size=255"], 2,
     "parallel.tensor_parallel: 2 must divide model.llm.ffn_hidden_size (256) and vocab_size (255)"),
    ("zero_stage_unknown", "tiny", ["parallel.zero_stage=4"], 2,
     "parallel.zero_stage: 4 is not a ZeRO stage; use 0, 1, 2 or 3"),
    ("backend_unknown", "tiny", ["parallel.backend=mpi"], 2,
     "parallel.backend: 'mpi' unknown; use auto, nccl or gloo"),
    ("collective_timeout", "tiny", ["parallel.collective_timeout_minutes=0"], 2,
     "parallel.collective_timeout_minutes: 0.0 must be > 0 (e.g. 10)"),
    ("watchdog_negative", "tiny", ["parallel.watchdog_seconds=-1"], 2,
     "parallel.watchdog_seconds: -1.0 must be >= 0 (0 turns the watchdog off)"),
    # batch and schedule
    ("micro_batch_below_one", "tiny", ["train.micro_batch=0"], 2, "train.micro_batch/global_batch: must be >= 1"),
    ("global_batch_not_divisible", "tiny", ["train.global_batch=96"], 2,
     "train.global_batch: 96 is not a multiple of micro_batch (32) x world size (2) = 64; set global_batch to a "
     "multiple of it"),
    ("stage1_batch_not_divisible_over_llm_dp", "cc", ["train.global_batch=24"], 2,
     "train.global_batch: 24 pairs is not a multiple of micro_batch (8) x LLM data-parallel size (2); stage 1 "
     "embeds micro_batch pairs at a time per model replica"),
    ("stage_renamed", "tiny", ["train.stage=stage1_cc"], 2, "train.stage: 'stage1_cc' was renamed; use 'llm2clip_cc'"),
    ("stage_unknown", "tiny", ["train.stage=stage3"], 2,
     "train.stage: 'stage3' unknown; use one of llm2clip_cc, proclip_inherit, stage2"),
    ("loss_unknown", "tiny", ["train.loss=hinge"], 2, "train.loss: 'hinge' unknown; use one of infonce"),
    ("siglip_without_bias", "tiny", ["train.loss=siglip"], 2,
     "model.logit_bias_init: the siglip loss needs a learnable bias (set logit_bias_init, e.g. -10)"),
    ("infonce_with_bias", "tiny", ["model.logit_bias_init=-10"], 2,
     "the InfoNCE losses take none (leave it null)"),
    ("self_distill_with_zero3", "tiny", ["train.self_distill_weight=1.0", "parallel.zero_stage=3"], 2,
     "train.self_distill_weight: the EMA teacher reads the student's full weights, which ZeRO-3 partitions; use "
     "parallel.zero_stage <= 2"),
    ("ema_momentum_one", "tiny", ["train.ema_momentum=1.0"], 2, "train.ema_momentum: 1.0 must lie in [0, 1)"),
    ("precision_fp16", "tiny", ["train.precision=fp16"], 2,
     "train.precision: 'fp16' unsupported; use fp32 or bf16"),
    ("steps_below_one", "tiny", ["train.steps=0", "train.warmup_steps=0"], 2, "train.steps: must be >= 1"),
    ("warmup_past_steps", "tiny", ["train.warmup_steps=501"], 2,
     "train.warmup_steps: 501 must lie in [0, train.steps=500]"),
    # model shape and inputs
    ("adapter_input_dim", "tiny", ["model.adapter.input_dim=64"], 2,
     "model.adapter.input_dim: 64 != model.llm.hidden_size 128; the adapter consumes the LLM's pooled embedding, so "
     "set them equal"),
    ("heads_zero", "tiny", ["model.llm.num_attention_heads=0"], 2,
     "model.llm.num_attention_heads/num_query_groups: must be >= 1"),
    ("query_groups_zero", "tiny", ["model.llm.num_query_groups=0"], 2,
     "model.llm.num_attention_heads/num_query_groups: must be >= 1"),
    ("heads_not_dividing_hidden", "tiny", ["model.llm.num_attention_heads=3", "model.llm.num_query_groups=1"], 2,
     "model.llm: hidden_size must be divisible by num_attention_heads"),
    ("query_groups_not_dividing_heads", "tiny", ["model.llm.num_query_groups=3"], 2,
     "and num_attention_heads by num_query_groups"),
    ("tokenizer_empty", "tiny", ["model.llm.tokenizer=''"], 2,
     "model.llm.tokenizer: empty; point it at a HuggingFace tokenizer directory"),
    ("tokenizer_missing", "tiny", ["model.llm.tokenizer={d}/nope"], 2,
     "model.llm.tokenizer: {d}/nope is not a directory; create it or fix the path"),
    ("tokenizer_unloadable", "tiny", ["model.llm.caption_format=llm2vec"], 2,
     "model.llm.tokenizer: {d}/tok does not load as a HuggingFace tokenizer"),
    ("llm2vec_without_chat_tokens", "tiny", ["model.llm.caption_format=llm2vec", "model.llm.tokenizer={d}/words"],
     2, "use caption_format=plain for other tokenizers"),
    ("hf_checkpoint_missing", "tiny", ["model.llm.hf_checkpoint={d}/nope"], 2,
     "model.llm.hf_checkpoint: {d}/nope is not a directory; point it at the HuggingFace checkpoint directory"),
    ("layer_spec_unknown", "tiny", ["model.llm.layer_spec=fused"], 2,
     "model.llm.layer_spec: 'fused' unknown; use auto, local or transformer_engine"),
    ("layer_spec_te_with_lora", "tiny", ["model.llm.layer_spec=transformer_engine", "model.llm.lora_rank=4"], 2,
     "model.llm.layer_spec: transformer_engine fuses the input norm into the linears LoRA adapts"),
    ("caption_format_unknown", "tiny", ["model.llm.caption_format=chat"], 2,
     "model.llm.caption_format: 'chat' unknown; use plain or llm2vec"),
    ("lora_with_offline_embeddings", "tiny",
     ["model.llm.lora_rank=4", "data.train_embedding_shards={d}/emb-000000.tar"], 2,
     "model.llm.lora_rank: a trainable LLM LoRA needs the LLM in the loop; offline mode"),
    ("llm_lora_lr_zero", "tiny", ["optim.llm_lora_lr=0"], 2, "optim.llm_lora_lr: 0.0 must be > 0 (or null"),
    ("lora_init_unresolvable", "tiny", ["model.llm.lora_init={d}/nope"], 2,
     "model.llm.lora_init: {d}/nope: no lora.safetensors, step directory or checkpoint root"),
    ("lora_init_incomplete", "tiny", ["model.llm.lora_init={d}/lora_incomplete"], 2,
     "or its adapter_config.json is missing; point it at a complete stage-1 checkpoint"),
    ("vision_pretrained_missing", "tiny", ["model.vision.pretrained_path={d}/nope.safetensors"], 2,
     "model.vision.pretrained_path: {d}/nope.safetensors is not a file; fix the path or set it to null"),
    ("adapter_init_missing", "tiny", ["model.adapter_init={d}/nope.safetensors"], 2,
     "model.adapter_init: {d}/nope.safetensors is not a file; run the step that writes it first"),
    ("vision_head_init_missing", "tiny", ["model.vision_head_init={d}/nope.safetensors"], 2,
     "model.vision_head_init: {d}/nope.safetensors is not a file; run the step that writes it first"),
    # checkpointing, evaluation, data
    ("checkpoint_dir_empty", "tiny", ["checkpoint.dir=''"], 2, "checkpoint.dir: empty; give the directory"),
    ("checkpoint_interval", "tiny", ["checkpoint.interval=-1"], 2,
     "checkpoint.interval: must be >= 0 (0 saves only at the end)"),
    ("keep_last", "tiny", ["checkpoint.keep_last=-1"], 2, "checkpoint.keep_last: must be >= 0 (0 keeps every"),
    ("eval_interval", "tiny", ["eval.interval=-1"], 2, "eval.interval: must be >= 0 (0 evaluates only at the end)"),
    ("skipped_steps", "tiny", ["train.max_consecutive_skipped_steps=0"], 2,
     "train.max_consecutive_skipped_steps: must be >= 1"),
    ("shuffle_block_shards", "tiny", ["data.shuffle_block_shards=0"], 2, "data.shuffle_block_shards: must be >= 1"),
    ("resume_missing", "tiny", ["train.resume={d}/nope"], 2,
     "train.resume: '{d}/nope' is neither auto, none, nor an existing checkpoint directory; give a step directory"),
    ("train_shards_empty", "tiny", ["data.train_shards=''"], 2,
     "data.train_shards: empty; give a shard pattern like"),
    ("train_shards_missing", "tiny", ["data.train_shards={d}/nope-{{0..2}}.tar"], 2,
     "data.train_shards: 3 of 3 file(s) missing, first {d}/nope-0.tar; fix the pattern or build the shards"),
    ("eval_shards_missing", "tiny", ["data.eval_shards={d}/nope.tar"], 2,
     "data.eval_shards: 1 of 1 file(s) missing, first {d}/nope.tar; fix the pattern"),
    ("train_embeddings_missing", "tiny", ["data.train_embedding_shards={d}/nope.tar"], 2,
     "data.train_embedding_shards: 1 of 1 file(s) missing, first {d}/nope.tar; write them with "
     "data_prep/embed_captions.py"),
    ("eval_embeddings_missing", "tiny", ["data.eval_embedding_shards={d}/nope.tar"], 2,
     "data.eval_embedding_shards: 1 of 1 file(s) missing"),
    ("caption_weight_negative", "tiny", ["data.caption_fields.short=-1"], 2,
     "data.caption_fields: give at least one field with a positive weight"),
    ("augment_unknown", "tiny", ["data.augment=flip"], 2,
     "data.augment: 'flip' unknown; use none or random_resized_crop"),
    ("image_mean_length", "tiny", ["data.image_mean=[0.5,0.5]"], 2, "data.image_mean/image_std: give 3 values (RGB)"),
    ("betas_length", "tiny", ["optim.betas=[0.9]"], 2, "optim.betas: give two values, got [0.9]"),
    # LLM2CLIP stage 1
    ("stage1_lora_rank_zero", "cc", ["model.llm.lora_rank=0"], 2,
     "model.llm.lora_rank: stage 1 trains LoRA adapters only; set it >= 1"),
    ("stage1_lora_dropout", "cc", ["model.llm.lora_dropout=1.0"], 2, "model.llm.lora_dropout: 1.0 must lie in [0, 1)"),
    ("stage1_temperature", "cc", ["stage1.temperature=0"], 2, "stage1.temperature: 0.0 must be > 0"),
    ("stage1_fields_equal", "cc", ["stage1.fields=[short,short]"], 2,
     "stage1.fields: ['short', 'short'] needs two distinct caption fields (query, positive)"),
    ("stage1_eval_fields_equal", "cc", ["stage1.eval_fields=[long,long]"], 2,
     "stage1.eval_fields: ['long', 'long'] needs two distinct caption fields"),
    ("stage1_negative_window", "cc", ["stage1.negative_window=1"], 2, "stage1.negative_window: 1 must be >= 2"),
    ("stage1_eval_pairs_missing", "cc", ["stage1.eval_pairs={d}/nope.tar"], 2,
     "stage1.eval_pairs: 1 of 1 file(s) missing, first {d}/nope.tar; fix the pattern"),
    ("stage1_mntp_steps", "cc", ["stage1.mntp_steps=-1"], 2, "stage1.mntp_steps: must be >= 0"),
    ("stage1_mntp_probability", "cc", ["stage1.mntp_probability=0"], 2,
     "stage1.mntp_probability: 0.0 must lie in (0, 1)"),
    ("stage1_mntp_lr", "cc", ["stage1.mntp_lr=0"], 2, "stage1.mntp_lr: must be > 0"),
    ("stage1_with_lora_init", "cc", ["model.llm.lora_init={d}/lora"], 2,
     "model.llm.lora_init: stage 1 trains its own LoRA; lora_init merges a finished stage 1"),
    # ProCLIP stage 1
    ("inherit_teacher_missing", "inherit", ["proclip.teacher_text={d}/nope"], 2,
     "proclip.teacher_text: '{d}/nope' is not a HuggingFace CLIP text model directory; train one with python "
     "data_prep/train_reference_clip.py"),
    ("inherit_weights_both_zero", "inherit", ["proclip.instance_weight=0", "proclip.structure_weight=0"], 2,
     "proclip.instance_weight/structure_weight: must be >= 0 and not both 0"),
    ("inherit_weight_negative", "inherit", ["proclip.structure_weight=-1"], 2,
     "proclip.instance_weight/structure_weight: must be >= 0 and not both 0"),
    ("inherit_with_zero3", "inherit", ["parallel.zero_stage=3"], 2,
     "parallel.zero_stage: ProCLIP stage 1 saves the adapter from each rank's full weights, which ZeRO-3 partitions; "
     "use zero_stage <= 2"),
    ("inherit_with_lora", "inherit", ["model.llm.lora_rank=4"], 2,
     "model.llm.lora_rank: ProCLIP stage 1 trains the adapter only; set lora_rank=0"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in files every base config's paths point at, plus a word-level tokenizer (no Llama-3 chat tokens) and
    a complete and an incomplete stage-1 LoRA checkpoint."""
    from llm2clip_scale.data.synthetic import train_tokenizer

    d = tmp_path_factory.mktemp("config_files")
    for name in ("train-000000.tar", "train-000001.tar", "eval-000000.tar", "emb-000000.tar"):
        (d / name).write_bytes(b"")
    (d / "tok").mkdir()
    (d / "teacher").mkdir()
    (d / "teacher" / "config.json").write_text("{}")
    for lora, parts in (("lora", ("lora.safetensors", "adapter_config.json")), ("lora_incomplete",
                                                                                ("lora.safetensors",))):
        (d / lora).mkdir()
        for part in parts:
            (d / lora / part).write_bytes(b"")
    (d / "words").mkdir()
    train_tokenizer(["a red circle left of a blue square"], d / "words")
    return d


@functools.cache
def _base_node(base: str, d: Path) -> DictConfig:
    """load_config's merge of a base config and its overrides, kept: the schema's structured node costs ~0.1 s."""
    path, base_overrides = BASES[base]
    layers = [OmegaConf.from_dotlist([item.format(d=d)]) for item in base_overrides]
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path), *layers)


def _problem_list(base: str, overrides: list[str], world: int, d: Path) -> list[str]:
    layers = [OmegaConf.from_dotlist([item.format(d=d)]) for item in overrides]
    cfg = OmegaConf.to_object(OmegaConf.merge(_base_node(base, d), *layers))  # as load_config(path, overrides)
    try:
        validate(cfg, world)
    except ConfigError as err:
        head, *problems = str(err).split("\n  - ")
        assert head == "invalid configuration:", str(err)
        return problems
    return []


@pytest.mark.parametrize("base", sorted(BASES))
def test_rule_table_bases_are_valid(base: str, files: Path) -> None:
    assert _problem_list(base, [], 2, files) == []
    path, base_overrides = BASES[base]  # the kept merge is load_config's
    expected = load_config(path, [item.format(d=files) for item in base_overrides])
    assert OmegaConf.to_object(_base_node(base, files)) == expected


@pytest.mark.parametrize("base, overrides, world, expected", [row[1:] for row in RULES], ids=[row[0] for row in RULES])
def test_each_rule_reports_its_field_and_fix(base: str, overrides: list[str], world: int, expected: str,
                                            files: Path) -> None:
    problems = _problem_list(base, overrides, world, files)
    assert len(problems) == 1, problems  # the rule fires, alone, on an otherwise valid config
    assert expected.format(d=files) in problems[0]


def test_a_map_given_whole_replaces_the_default(tmp_path: Path) -> None:
    """caption_fields {short, long} in a YAML file (or a ``key={...}`` override) is the whole map, not the schema's
    default raw: 1.0 plus those; a dotted override of one entry edits the map below it."""
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  caption_fields: {short: 0.5, long: 0.5}\n")
    assert load_config(config).data.caption_fields == {"short": 0.5, "long": 0.5}
    assert load_config(config, ["data.caption_fields.raw=0.2"]).data.caption_fields == {
        "short": 0.5, "long": 0.5, "raw": 0.2}
    assert load_config(config, ["data.caption_fields={long: 1.0}"]).data.caption_fields == {"long": 1.0}
    assert load_config(None).data.caption_fields == {"raw": 1.0}


def test_every_map_field_with_a_default_replaces_whole() -> None:
    import dataclasses
    import typing

    from llm2clip_scale.config.load import MAP_FIELDS

    def maps(cls: type, prefix: str) -> list[str]:
        found = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                found += maps(kind, f"{prefix}{f.name}.")
            elif typing.get_origin(kind) is dict and f.default_factory is not dataclasses.MISSING:
                if f.default_factory():  # an empty default has nothing to keep beside a given map
                    found.append(prefix + f.name)
        return found

    assert sorted(maps(Config, "")) == sorted(MAP_FIELDS)
