"""Config loading and validation: every rule names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2clip_scale.cli import main as cli_main
from llm2clip_scale.config import ConfigError, load_config, validate

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
