"""Training data at scale: weighted dataset mixing, dataset indexes as shard sources, sidecar folders, exact resume of a
mixed stream, and fewer shards than consumers."""

from __future__ import annotations

import math
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds

from llm2clip_scale.config.load import ConfigError, expand_shards, load_config, validate
from llm2clip_scale.config.schema import DataConfig, DatasetSource, train_sources, trains_offline
from llm2clip_scale.data.index import DatasetIndex, DatasetIndexError, ShardEntry, write_index
from llm2clip_scale.data.loader import build_train_loader
from llm2clip_scale.data.shards import paired_shard_list
from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset

SIZE = 16
PARAMS = SyntheticParams(train_samples=96, eval_samples=8, image_size=SIZE, samples_per_shard=24, seed=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixing") / "ds"
    build_synthetic_dataset(out, PARAMS)
    # A damaged copy of shard 3: every second image is junk bytes (skipped as bad_image by the loader).
    with wds.TarWriter(str(out / "half-bad-000000.tar")) as sink:
        for i, sample in enumerate(wds.WebDataset(str(out / "train-000003.tar"), shardshuffle=False)):
            record = {k: v for k, v in sample.items() if not k.startswith("__url")}
            if i % 2:
                record = {**record, "jpg": b"not a jpeg"}
            sink.write(record)
    return out


def _data(synth: Path, datasets: list[DatasetSource], **overrides) -> DataConfig:
    return replace(DataConfig(train_datasets=datasets, caption_fields={"short": 1.0}, num_workers=0,
                              shuffle_buffer=16, shuffle_block_shards=2), **overrides)


def _take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("a training stream ended")


def _loader(synth: Path, data: DataConfig, batch: int = 16, rank: int = 0, world: int = 1):
    return build_train_loader(data, str(synth / "tokenizer"), SIZE, batch, rank, world, seed=5, max_text_len=24)


def _within_binomial(count: int, n: int, p: float) -> bool:
    # 4 standard deviations of a binomial draw: a correct mix fails this about once in 16,000 seeds.
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_mixing_honours_weights_not_dataset_sizes(synth: Path) -> None:
    small = DatasetSource(shards=str(synth / "train-000000.tar"), weight=3.0, name="small")
    large = DatasetSource(shards=str(synth / "train-{000001..000003}.tar"), weight=1.0, name="large")
    batches = _take(_loader(synth, _data(synth, [small, large])), 25)
    names = [name for batch in batches for name in batch["datasets"]]
    n, from_small = len(names), names.count("small")
    assert n == 400 and set(names) == {"small", "large"}
    # By samples the small set is a quarter of the data; by weight it gets three quarters.
    assert _within_binomial(from_small, n, 0.75), from_small
    small_keys = {s["__key__"] for s in wds.WebDataset(small.shards, shardshuffle=False)}
    for batch in batches:  # every key really comes from the dataset the batch names
        assert all((key in small_keys) == (name == "small") for key, name in zip(batch["keys"], batch["datasets"]))


def test_each_dataset_draws_its_own_caption_fields(synth: Path) -> None:
    a = DatasetSource(shards=str(synth / "train-000000.tar"), caption_fields={"raw": 1.0}, name="a")
    b = DatasetSource(shards=str(synth / "train-000001.tar"), caption_fields={"long": 1.0}, name="b")
    c = DatasetSource(shards=str(synth / "train-000002.tar"), name="c")  # falls back to data.caption_fields
    batches = _take(_loader(synth, _data(synth, [a, b, c])), 6)
    expected = {"a": "raw", "b": "long", "c": "short"}
    pairs = {(d, f) for batch in batches for d, f in zip(batch["datasets"], batch["caption_fields"])}
    assert pairs == {(d, f) for d, f in expected.items()}


def test_weights_count_usable_samples_when_a_dataset_is_damaged(synth: Path) -> None:
    clean = DatasetSource(shards=str(synth / "train-000000.tar"), weight=1.0, name="clean")
    damaged = DatasetSource(shards=str(synth / "half-bad-000000.tar"), weight=1.0, name="damaged")
    loader = _loader(synth, _data(synth, [clean, damaged]))
    batches = _take(loader, 20)
    names = [name for batch in batches for name in batch["datasets"]]
    # Half of the damaged set's samples are skipped, yet it still supplies half of the good examples.
    assert _within_binomial(names.count("damaged"), len(names), 0.5), names.count("damaged")
    assert batches[-1]["skipped"]["bad_image"] >= names.count("damaged") // 2
    assert loader.skipped() == batches[-1]["skipped"]


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_stream_resumes_exactly(synth: Path, workers: int) -> None:
    datasets = [DatasetSource(shards=str(synth / "train-{000000..000001}.tar"), weight=2.0, name="a"),
                DatasetSource(shards=str(synth / "half-bad-000000.tar"), weight=1.0, name="b")]
    data = _data(synth, datasets, num_workers=workers, augment="random_resized_crop")
    whole = _take(_loader(synth, data, batch=8), 7)
    first = _loader(synth, data, batch=8)
    _take(first, 4)
    state = first.state_dict()
    resumed = _loader(synth, data, batch=8)
    resumed.load_state_dict(state)
    rest = _take(resumed, 3)
    for expected, got in zip(whole[4:], rest):
        assert got["keys"] == expected["keys"] and got["datasets"] == expected["datasets"]
        assert got["caption_fields"] == expected["caption_fields"]
        assert torch.equal(got["images"], expected["images"])  # crops too: the augmentation RNG resumed
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert got["skipped"] == expected["skipped"]


def test_one_shard_feeds_four_consumers_without_hanging(synth: Path) -> None:
    data = DataConfig(train_shards=str(synth / "train-000000.tar"), caption_fields={"short": 1.0}, num_workers=2,
                      shuffle_buffer=8)
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("loader hung")))
    signal.alarm(120)
    try:
        streams = [_take(_loader(synth, data, batch=8, rank=rank, world=2), 4) for rank in range(2)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    keys = [[batch["keys"] for batch in stream] for stream in streams]
    # 2 ranks x 2 workers share one shard: each resamples it under its own seed (no rank or worker runs dry).
    assert all(len(batch) == 8 for stream in keys for batch in stream)
    assert keys[0] != keys[1]
    assert keys[0][0] != keys[0][1]  # batches 0 and 1 come from different workers


def test_dataset_index_is_a_shard_source(synth: Path, tmp_path: Path) -> None:
    shards = [synth / f"train-00000{i}.tar" for i in range(4)]
    index = tmp_path / "index.json"
    write_index(index, DatasetIndex([ShardEntry(str(p), 24, p.stat().st_size) for p in shards]))  # absolute names
    assert expand_shards(str(index)) == [str(p) for p in shards]
    by_pattern = DataConfig(train_shards=str(synth / "train-{000000..000003}.tar"), caption_fields={"short": 1.0},
                            num_workers=0, shuffle_buffer=16)
    by_index = replace(by_pattern, train_shards=str(index))
    a, b = _take(_loader(synth, by_pattern), 3), _take(_loader(synth, by_index), 3)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]


def test_index_names_are_relative_to_its_folder(synth: Path) -> None:
    index = synth / "index.json"
    write_index(index, DatasetIndex([ShardEntry("train-000001.tar", 24, 1), ShardEntry("train-000000.tar", 24, 1)]))
    try:
        assert expand_shards(str(index)) == [str(synth / "train-000001.tar"), str(synth / "train-000000.tar")]
        assert expand_shards(f"{synth / 'eval-000000.tar'}::{index}")[1:] == expand_shards(str(index))
    finally:
        index.unlink()


def test_unusable_index_is_a_clear_config_error(synth: Path, tmp_path: Path) -> None:
    bad = tmp_path / "index.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(DatasetIndexError, match="not a dataset index"):
        expand_shards(str(bad))
    gone = tmp_path / "moved.json"
    write_index(gone, DatasetIndex([ShardEntry("train-000000.tar", 24, 1)]))  # shards not beside it
    cfg = load_config(None, [f"data.train_shards={bad}", f"data.eval_shards={gone}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert "data.train_shards: " in str(err.value) and "not a dataset index" in str(err.value)
    assert "data.eval_shards: " in str(err.value) and "listed by the index is missing" in str(err.value)


def test_sidecar_folder_pairs_by_shard_name(synth: Path, tmp_path: Path) -> None:
    pairs = paired_shard_list(str(synth / "train-{000000..000002}.tar"), str(tmp_path), "data.train_shards")
    assert pairs == [(str(synth / f"train-00000{i}.tar"), str(tmp_path / f"train-00000{i}.tar")) for i in range(3)]


def test_train_sources_and_offline_mode() -> None:
    single = DataConfig(train_shards="a.tar", train_embedding_shards="emb/", caption_fields={"raw": 1.0})
    assert train_sources(single) == [DatasetSource("a.tar", "emb/", {"raw": 1.0}, 1.0, "train")]
    assert trains_offline(single)
    mixed = DataConfig(train_datasets=[DatasetSource("a.tar"), DatasetSource("b.tar", caption_fields={"long": 2.0})])
    assert [(s.name, s.caption_fields) for s in train_sources(mixed)] == [("dataset0", {"raw": 1.0}),
                                                                          ("dataset1", {"long": 2.0})]
    assert not trains_offline(mixed)


def test_config_check_names_every_mixing_problem(synth: Path, tmp_path: Path) -> None:
    good = str(synth / "train-000000.tar")
    cfg = load_config(None, [f"data.train_shards={good}"])
    cfg.data.train_datasets = [
        DatasetSource(shards=good, weight=0.0, name="x"),
        DatasetSource(shards=str(tmp_path / "none-{0..1}.tar"), embedding_shards=str(tmp_path), name="x"),
        DatasetSource(shards="", caption_fields={"raw": -1.0}),
    ]
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    text = str(err.value)
    for expected in (
        "data.train_shards/train_embedding_shards: set, but data.train_datasets is given too",
        "data.train_datasets[0].weight: 0.0 must be a positive number",
        "data.train_datasets[1].shards: 2 of 2 file(s) missing",
        "data.train_datasets[2].shards: empty",
        "data.train_datasets[2].caption_fields: give at least one field with a positive weight",
        "names ['x', 'x', 'dataset2'] repeat",
        "some datasets give embedding_shards and some do not",
    ):
        assert expected in text, expected
