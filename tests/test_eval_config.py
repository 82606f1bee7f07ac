"""eval.tasks in the config: defaults keep today's single eval, bad values fail validation with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2clip_scale.config import ConfigError, load_config, validate
from llm2clip_scale.eval.task_config import task_source, zeroshot_classes_path
from tests.conftest import REPO, tiny_overrides

CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _cfg(data: Path, tmp: Path, *extra: str):
    return load_config(CONFIG, tiny_overrides(data, tmp, 2, *extra))


def test_defaults_and_task_sources(tiny_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_data, tmp_path)
    assert cfg.eval.tasks == ["long_retrieval"]
    validate(cfg, 2)
    cfg = _cfg(tiny_data, tmp_path, "eval.tasks=[retrieval,zeroshot,cra]", f"eval.cra_data={tmp_path}/pairs.jsonl")
    assert task_source(cfg, "retrieval") == cfg.data.eval_shards
    assert task_source(cfg, "cra") == f"{tmp_path}/pairs.jsonl"
    assert zeroshot_classes_path(cfg) == tiny_data / "zeroshot.json"  # beside the zero-shot data by default
    with pytest.raises(ConfigError, match=r"eval\.cra_data: .*pairs\.jsonl is not a file"):
        validate(cfg, 2)


@pytest.mark.parametrize(("extra", "message"), [
    (["eval.tasks=[retrieval,retreival]"], r"eval\.tasks: .* must name distinct tasks"),
    (["eval.tasks=[cra,cra]"], r"eval\.tasks: .* must name distinct tasks"),
    (["eval.tasks=[zeroshot]", "eval.zeroshot_classes=/nonexistent/classes.json"], r"eval\.zeroshot_classes: "),
    (["eval.tasks=[retrieval]", "data.eval_shards=null"], r"eval\.tasks: retrieval has no data"),
    (["eval.tasks=[cra]", "train.stage=proclip_inherit"], r"eval\.tasks: cra run on stage-2 models only"),
    (["eval.tasks=[retrieval]", "eval.retrieval_data=/nonexistent/coco-{000000..000003}.tar"],
     r"eval\.retrieval_data: 4 of 4 file\(s\) missing"),
])
def test_bad_eval_settings_are_config_errors(tiny_data: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(tiny_data, tmp_path, *extra), 2)


def test_bad_zeroshot_classes_file_is_a_clear_error(tmp_path: Path) -> None:
    from llm2clip_scale.eval.tasks import load_zeroshot_classes

    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classes": ["cat"], "templates": ["a photo"]}))
    with pytest.raises(ValueError, match="exactly one"):
        load_zeroshot_classes(path)
    path.write_text(json.dumps({"classes": "cat", "templates": ["a {}"]}))
    with pytest.raises(ValueError, match="must hold"):
        load_zeroshot_classes(path)
    path.write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a {}"]}))
    assert load_zeroshot_classes(path) == (["cat", "dog"], ["a {}"])
