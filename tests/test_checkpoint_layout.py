"""The checkpoint directory rules, on hand-made directories: completeness, resume lookup, checksums, pruning,
the ``inspect`` command, and the loader's exact data resume (2 ranks x 2 workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm2clip_scale.checkpoint import layout
from llm2clip_scale.checkpoint.layout import CheckpointError
from llm2clip_scale.cli import main
from tests.conftest import REPO


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    tmp = layout.tmp_dir(root, step)
    (tmp / "train_state").mkdir(parents=True)
    (tmp / "train_state" / "rank0.pt").write_bytes(b"state of step %d" % step)
    files = dict([layout.file_record(tmp / "train_state" / "rank0.pt", tmp)])
    if not complete:
        return tmp
    (tmp / layout.MANIFEST).write_text(json.dumps({"step": step, "stage": "stage2", "files": files}))
    layout.commit(tmp, layout.step_dir(root, step))
    return layout.step_dir(root, step)


def test_resume_auto_takes_the_newest_complete_checkpoint_and_skips_unfinished_ones(tmp_path: Path, caplog) -> None:
    assert layout.resolve_checkpoint("auto", tmp_path / "nothing") is None
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # killed mid-save
    assert (tmp_path / layout.LATEST).read_text().strip() == "step4"
    assert layout.resolve_checkpoint("auto", tmp_path) == tmp_path / "step4"
    assert "incomplete checkpoint" in caplog.text and ".step6.tmp" in caplog.text
    assert layout.resolve_checkpoint("none", tmp_path) is None
    assert layout.resolve_checkpoint(str(tmp_path), tmp_path) == tmp_path / "step4"  # a root: its latest
    assert layout.resolve_checkpoint(str(tmp_path / "step2"), tmp_path) == tmp_path / "step2"
    with pytest.raises(CheckpointError, match="manifest"):
        layout.resolve_checkpoint(str(tmp_path / ".step6.tmp"), tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        layout.resolve_checkpoint(str(tmp_path / "step9"), tmp_path)
    assert layout.remove_stale_saves(tmp_path) == [tmp_path / ".step6.tmp"]
    assert not (tmp_path / ".step6.tmp").exists()


def test_verification_names_the_missing_and_the_corrupt_file(tmp_path: Path) -> None:
    step = _fake_checkpoint(tmp_path, 2)
    assert layout.verify_files(step) == []
    (step / "train_state" / "rank0.pt").write_bytes(b"state of step 3")  # same size, other bytes
    assert layout.verify_files(step) == [f"{step}/train_state/rank0.pt: checksum differs from the manifest (corrupt)"]
    (step / "train_state" / "rank0.pt").unlink()
    assert layout.verify_files(step) == [f"{step}/train_state/rank0.pt: missing"]


def test_prune_keeps_the_newest_n_and_never_the_newest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    assert layout.prune(tmp_path, keep_last=0) == []
    assert layout.prune(tmp_path, keep_last=2) == [tmp_path / "step2", tmp_path / "step4"]
    assert [s for s, _ in layout.complete_checkpoints(tmp_path)] == [6, 8]
    assert layout.prune(tmp_path, keep_last=1) == [tmp_path / "step6"]
    assert layout.resolve_checkpoint("auto", tmp_path) == tmp_path / "step8"


def test_inspect_reports_step_and_integrity(tmp_path: Path, capsys) -> None:
    step = _fake_checkpoint(tmp_path, 2)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2 and report["integrity"] == "ok" and report["parts"] == ["train_state"]
    (step / "train_state" / "rank0.pt").write_bytes(b"x")
    assert main(["inspect", str(step)]) == 1
    out = capsys.readouterr().out
    assert "corrupt" in out and "rank0.pt" in out
    assert main(["inspect", str(tmp_path / "nope")]) == 2


def _loader(data: Path, rank: int, augment: str = "random_resized_crop"):
    from llm2clip_scale.config import load_config
    from llm2clip_scale.data.loader import build_train_loader

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"data.train_shards={data}/train-{{000000..000003}}.tar", f"model.llm.tokenizer={data}/tokenizer",
        "data.num_workers=2", "data.shuffle_buffer=40", f"data.augment={augment}", "data.shuffle_block_shards=1",
    ])
    return build_train_loader(cfg.data, cfg.model.llm.tokenizer, 32, 4, rank, 2, seed=3,
                              max_text_len=cfg.data.max_text_len)


def _same_batch(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and a["caption_fields"] == b["caption_fields"]
            and torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"]))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_restored_loader_yields_exactly_the_batches_that_come_next(tiny_data: Path, rank: int) -> None:
    # 2 workers, shuffling within blocks of 1 shard (64 samples), caption-field mixing and random crops: after 43
    # batches of 4 worker 0 is 24 samples into its second block, and the next batch is worker 1's (odd count).
    uninterrupted = iter(_loader(tiny_data, rank))
    expected = [next(uninterrupted) for _ in range(60)]
    first = _loader(tiny_data, rank)
    stream = iter(first)
    for _ in range(43):
        next(stream)
    state = first.state_dict()
    assert state["consumed"] == 43 and set(state["workers"]) == {0, 1}
    resumed = _loader(tiny_data, rank)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through plain data
    again = iter(resumed)
    for index in range(43, 60):
        assert _same_batch(next(again), expected[index]), index
    assert all(not _same_batch(expected[i], expected[i + 1]) for i in range(59))


def test_a_loader_state_refuses_another_worker_count(tiny_data: Path) -> None:
    loader = _loader(tiny_data, 0)
    state = loader.state_dict()
    state["num_workers"] = 3
    with pytest.raises(ValueError, match="num_workers"):
        loader.load_state_dict(state)


def test_a_resume_under_other_lora_settings_is_named_setting_by_setting(tmp_path: Path) -> None:
    assert layout.lora_settings_mismatch(tmp_path, 16, 32.0, ["q"]) == []  # no LLM LoRA saved: nothing to compare
    meta = {"lora_rank": 16, "lora_alpha": 32.0, "lora_targets": ["q", "v"]}
    (tmp_path / layout.ADAPTER_CONFIG_FILE).write_text(json.dumps(meta))
    assert layout.lora_settings_mismatch(tmp_path, 16, 32, ["v", "q"]) == []
    assert layout.lora_settings_mismatch(tmp_path, 8, 16.0, ["q", "v"]) == [
        "model.llm.lora_rank=8 but the checkpoint was trained with 16",
        "model.llm.lora_alpha=16.0 but the checkpoint was trained with 32.0"]
    assert layout.lora_settings_mismatch(tmp_path, 16, 32.0, ["q"]) == [
        "model.llm.lora_targets=['q'] but the checkpoint was trained with ['q', 'v']"]
    # Stage 1 with MNTP records MNTP and SimCSE stacked: rank 2r, alpha 2 alpha, of the run's r and alpha.
    (tmp_path / layout.ADAPTER_CONFIG_FILE).write_text(json.dumps({**meta, "lora_rank": 32, "lora_alpha": 64.0,
                                                                    "mntp": {"steps": 2}}))
    assert layout.lora_settings_mismatch(tmp_path, 16, 32.0, ["q", "v"]) == []
