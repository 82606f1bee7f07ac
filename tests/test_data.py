"""Synthetic data set, tokenizer and webdataset loaders (train: resampled; eval: exact, rank-partitioned)."""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import normalize, to_tensor
from transformers import AutoTokenizer

from llm2clip_scale.config.schema import DataConfig
from llm2clip_scale.data import synthetic
from llm2clip_scale.data.loader import SkipCounter, SkipTally, build_eval_loader, build_train_loader, read_shards
from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
SMALL = SyntheticParams(train_samples=96, eval_samples=24, image_size=SIZE, samples_per_shard=24, seed=0)


def _read_shards(paths: list[Path]) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))


def _metas(paths: list[Path]) -> dict[str, dict]:
    return {s["__key__"]: json.loads(s["json"]) for s in _read_shards(paths)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    build_synthetic_dataset(out, SMALL)
    return out


def _cfg(synth: Path, **overrides) -> DataConfig:
    base = DataConfig(
        train_shards=str(synth / "train-{000000..000003}.tar"),
        eval_shards=str(synth / "eval-000000.tar"),
        caption_fields={"short": 1.0},
        num_workers=0,
        shuffle_buffer=32,
    )
    return replace(base, **overrides)


def _take(loader, n: int) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


# ------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_reusable_and_atomic(tmp_path: Path) -> None:
    params = SyntheticParams(train_samples=12, eval_samples=4, image_size=SIZE, samples_per_shard=5, seed=3)
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_synthetic_dataset(first, params)
    build_synthetic_dataset(second, params)
    build_synthetic_dataset(other, replace(params, seed=4))

    shards = sorted(p.name for p in first.glob("*.tar"))
    assert shards == ["eval-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for name in shards:  # same seed: byte-identical shards
        assert (first / name).read_bytes() == (second / name).read_bytes()
    ours = _metas(sorted(first.glob("train-*.tar")))
    theirs = _metas(sorted(other.glob("train-*.tar")))
    assert ours.keys() == theirs.keys()
    assert sum(ours[k]["long"] != theirs[k]["long"] for k in ours) >= 10  # a different seed gives other scenes

    summary = json.loads((first / "dataset.json").read_text())
    assert summary["splits"]["train"] == {"samples": 12, "shards": 3, "pattern": "train-{000000..000002}.tar"}
    assert summary["splits"]["eval"]["samples"] == 4
    assert summary["caption_fields"] == ["raw", "short", "long"] and summary["seed"] == 3
    assert 4 + 10 < summary["vocab_size"] < 256

    assert build_synthetic_dataset(first, params).reused
    with pytest.raises(FileExistsError):
        build_synthetic_dataset(first, replace(params, train_samples=13))
    assert not build_synthetic_dataset(first, replace(params, train_samples=13), force=True).reused
    assert json.loads((first / "dataset.json").read_text())["splits"]["train"]["samples"] == 13
    assert not list(tmp_path.glob(".*"))  # no temp or old directories left behind


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "train_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        build_synthetic_dataset(tmp_path / "ds", SyntheticParams(train_samples=4, eval_samples=2, image_size=SIZE))
    assert list(tmp_path.iterdir()) == []


def test_make_synthetic_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "data_prep" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--out", str(tmp_path / "ds"), "--train-samples", "6", "--eval-samples", "2", "--image-size", "16"]
    assert cli.main([*args, "--samples-per-shard", "4"]) == 0
    assert "train: 6 samples in 2 shard(s)" in capsys.readouterr().out
    assert cli.main([*args, "--samples-per-shard", "4"]) == 0
    assert "reused" in capsys.readouterr().out
    assert cli.main(args) == 2  # other parameters over a complete dataset need --force
    assert cli.main([*args, "--force"]) == 0


def test_captions_mention_every_object(synth: Path) -> None:
    metas = _metas(sorted(synth.glob("*.tar")))
    assert len(metas) == SMALL.train_samples + SMALL.eval_samples
    counts = {len(m["objects"]) for m in metas.values()}
    assert counts == {1, 2, 3}
    for meta in metas.values():
        nouns = [f"{o['colour']} {o['shape']}" for o in meta["objects"]]
        assert any(o["shape"] in meta["raw"] for o in meta["objects"])
        for obj, noun in zip(meta["objects"], nouns):
            assert f"a {obj['size']} {noun}" in meta["short"]
            assert f"a {obj['size']} {noun} is in the " in meta["long"]
        for i, a in enumerate(nouns):  # every pair has a relation sentence
            for b in nouns[i + 1 :]:
                assert f"the {a} is " in meta["long"] and f" the {b}." in meta["long"]
        assert meta["background"] in meta["long"]


def test_tokenizer_loads_offline_and_covers_captions(synth: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(synth / "tokenizer"))
    assert len(tok) < 256 and len(tok) == json.loads((synth / "dataset.json").read_text())["vocab_size"]
    assert tok.pad_token == "[PAD]" and tok.padding_side == "right"
    captions = [m[f] for m in _metas([synth / "eval-000000.tar"]).values() for f in ("raw", "short", "long")]
    ids = tok(captions)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert all(row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id for row in ids)
    assert tok.decode(tok("A Large RED circle")["input_ids"], skip_special_tokens=True) == "a large red circle"


# ----------------------------------------------------------------------------------------------------- train loader


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_are_shaped_and_normalised(synth: Path, workers: int) -> None:
    cfg = _cfg(synth, num_workers=workers, caption_fields={"short": 1.0, "long": 1.0})
    loader = build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 8, 0, 1, 0, max_text_len=16)
    batches = _take(loader, 3)
    raw = {s["__key__"]: s for s in _read_shards(sorted(synth.glob("train-*.tar")))}
    for batch in batches:
        assert batch["images"].shape == (8, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 8
        assert ids.shape[1] <= 16 and mask.sum(1).max() == ids.shape[1]  # padded to the longest, truncated
        assert (ids[mask == 0] == 0).all() and (mask[:, 0] == 1).all()  # right padding with [PAD]=0
        assert batch["skipped"] == {} and len(batch["keys"]) == 8
        for i, key in enumerate(batch["keys"]):
            meta = json.loads(raw[key]["json"])
            assert batch["captions"][i] == meta[batch["caption_fields"][i]]
            expected = normalize(to_tensor(Image.open(io.BytesIO(raw[key]["png"]))), cfg.image_mean, cfg.image_std)
            torch.testing.assert_close(batch["images"][i], expected, atol=1e-5, rtol=0)


def test_train_ranks_differ_and_reruns_are_identical(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(synth, num_workers=2, augment="random_resized_crop", caption_fields={"raw": 1.0, "long": 1.0})
    tok = str(synth / "tokenizer")

    def run(rank: int, seed: int = 0) -> list[dict]:
        return _take(build_train_loader(cfg, tok, SIZE, 8, rank, 2, seed, max_text_len=32), 4)

    rank0, rank1 = run(0), run(1)
    monkeypatch.setenv("RANK", "1")  # the launcher's env must not matter: only the rank argument splits data
    monkeypatch.setenv("WORLD_SIZE", "4")
    rerun = run(0)
    keys0 = [k for b in rank0 for k in b["keys"]]
    keys1 = [k for b in rank1 for k in b["keys"]]
    assert not set(keys0) & set(keys1)  # 4 shards, 2 ranks: disjoint shard subsets
    for a, b in zip(rank0, rerun):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert keys0 != [k for b in run(0, seed=1) for k in b["keys"]]
    loader = build_train_loader(cfg, tok, SIZE, 8, 0, 2, 0, max_text_len=32)
    first_pass, second_pass = _take(loader, 2), _take(loader, 2)
    assert [b["keys"] for b in first_pass] == [b["keys"] for b in rank0[:2]]
    assert [b["keys"] for b in second_pass] != [b["keys"] for b in first_pass]  # a new pass is not a replay


def test_a_text_only_stream_is_the_image_streams_text_without_decoding(synth: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """images=False (ProCLIP stage 1): the same samples, captions and token ids as the image stream on clean data,
    random crops included (their RNG is the augmentation's own), and not one image decoded."""
    cfg = _cfg(synth, num_workers=0, augment="random_resized_crop", caption_fields={"raw": 1.0, "long": 1.0})
    tok = str(synth / "tokenizer")
    with_images = _take(build_train_loader(cfg, tok, SIZE, 8, 0, 1, 0, max_text_len=32), 4)
    import llm2clip_scale.data.samples as samples

    opened = []
    real_open = samples.Image.open
    monkeypatch.setattr(samples.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    text_only = _take(build_train_loader(cfg, tok, SIZE, 8, 0, 1, 0, max_text_len=32, images=False), 4)
    assert opened == [] and all("images" not in batch for batch in text_only)
    for a, b in zip(with_images, text_only, strict=True):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pool_mask"], b["pool_mask"])


def test_random_crop_leaves_global_rng_alone_in_process(synth: Path) -> None:
    cfg = _cfg(synth, augment="random_resized_crop")
    state = torch.get_rng_state()
    first = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, 0, 32), 2)
    assert torch.equal(state, torch.get_rng_state())
    second = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, 0, 32), 2)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, second))


def test_caption_field_mixing_follows_weights(synth: Path) -> None:
    cfg = _cfg(synth, caption_fields={"short": 3.0, "long": 1.0, "raw": 0.0})
    batches = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 50, 0, 1, 0, 64), 8)
    fields = [f for b in batches for f in b["caption_fields"]]
    assert len(fields) == 400 and "raw" not in fields
    # 3:1 → 0.75; binomial sd over 400 draws is 0.022, so ±0.07 is over 3 sd (and the stream is seeded anyway).
    assert abs(fields.count("short") / len(fields) - 0.75) < 0.07


def test_caption_weights_renormalise_over_present_fields(tmp_path: Path, synth: Path) -> None:
    records = [_record(f"only-long-{i:02d}", _jpg(i), {"long": f"caption {i}"}) for i in range(12)]
    _write_tar(tmp_path / "mix-000000.tar", records)
    cfg = DataConfig(train_shards=str(tmp_path / "mix-000000.tar"), caption_fields={"short": 3.0, "long": 1.0})
    cfg = replace(cfg, num_workers=0, shuffle_buffer=0)
    batches = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 6, 0, 1, 0, 16), 4)
    assert {f for b in batches for f in b["caption_fields"]} == {"long"}


# --------------------------------------------------------------------------------------------------------- bad data


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (seed * 20 % 256, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def _record(key: str, image: bytes | None, meta: dict | bytes | None) -> dict:
    record: dict = {"__key__": key}
    if image is not None:
        record["jpg"] = image
    if meta is not None:
        record["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return record


def _write_tar(path: Path, records: list[dict]) -> None:
    with wds.TarWriter(str(path), mtime=0) as sink:
        for record in records:
            sink.write(record)


def _bad_dataset(root: Path) -> list[str]:
    """Three shards with one fault of each kind; returns the keys of the good samples, in order."""
    good = lambda key: _record(key, _jpg(len(key)), {"short": f"good {key}"})  # noqa: E731
    shard_a = [
        good("a0"),
        good("a1"),
        _record("junk-jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg", {"short": "x"}),  # bad_image
        good("a2"),
        _record("wrong-field", _jpg(1), {"raw": "only raw"}),  # missing_caption (short is wanted)
        _record("no-json", _jpg(2), None),  # missing_caption
        _record("cut-jpg", _jpg(3)[:120], {"short": "x"}),  # bad_image: valid header, truncated data
        _record("bad-json", _jpg(4), b"{not json"),  # bad_json
        _record("blank", _jpg(5), {"short": "   "}),  # missing_caption
        _record("no-image", None, {"short": "x"}),  # missing_image
        good("a3"),
    ]
    _write_tar(root / "bad-000000.tar", shard_a)
    _write_tar(root / "bad-000001.tar", [good(f"b{i}") for i in range(4)])
    data = (root / "bad-000001.tar").read_bytes()
    cut = data.index(b"good b3") - 200  # inside the last sample's jpg: b0..b2 survive, b3 is lost with the tail
    (root / "bad-000001.tar").write_bytes(data[:cut])
    _write_tar(root / "bad-000002.tar", [good("c0"), good("c1")])
    return ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "c0", "c1"]


EXPECTED_SKIPS = {"bad_image": 2, "missing_caption": 3, "bad_json": 1, "missing_image": 1, "read_error": 1}


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_skipped_and_counted_exactly(tmp_path: Path, synth: Path, workers: int) -> None:
    good_keys = _bad_dataset(tmp_path)
    cfg = DataConfig(eval_shards=str(tmp_path / "bad-{000000..000002}.tar"), num_workers=workers)
    loader = build_eval_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, None, 16, "short")
    batches = list(loader)
    assert [len(b["keys"]) for b in batches] == [4, 4, 1]
    assert [k for b in batches for k in b["keys"]] == good_keys
    assert [c for b in batches for c in b["captions"]] == [f"good {k}" for k in good_keys]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(good_keys)))
    assert batches[-1]["skipped"] == EXPECTED_SKIPS == loader.last_skipped


def test_train_loader_survives_bad_data(tmp_path: Path, synth: Path) -> None:
    good_keys = set(_bad_dataset(tmp_path))
    cfg = DataConfig(train_shards=str(tmp_path / "bad-{000000..000002}.tar"), caption_fields={"short": 1.0})
    cfg = replace(cfg, num_workers=2, shuffle_buffer=4)
    batches = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, 0, 16), 15)
    assert {k for b in batches for k in b["keys"]} <= good_keys
    totals = [sum(b["skipped"].values()) for b in batches]
    assert totals == sorted(totals) and set(batches[-1]["skipped"]) == set(EXPECTED_SKIPS)
    # A text-only stream neither needs nor checks images: only the caption and shard faults remain.
    text_only = _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, 0, 16, images=False), 15)
    assert {k for b in text_only for k in b["keys"]} <= good_keys | {"junk-jpg", "cut-jpg", "no-image"}
    assert set(text_only[-1]["skipped"]) == set(EXPECTED_SKIPS) - {"bad_image", "missing_image"}


def test_every_truncation_point_yields_complete_samples_and_one_read_error(tmp_path: Path) -> None:
    whole = tmp_path / "whole.tar"
    _write_tar(whole, [_record(f"k{i}", _jpg(i), {"short": "x"}) for i in range(3)])
    data = whole.read_bytes()
    outcomes = set()
    for cut in [*range(0, len(data), 61), len(data)]:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        skips = SkipCounter("test")
        samples = list(read_shards([{"url": str(tmp_path / "cut.tar")}], skips))
        assert all(s["jpg"] == _jpg(int(s["__key__"][1])) and "json" in s for s in samples)
        outcomes.add((tuple(s["__key__"] for s in samples), skips.counts.get("read_error", 0)))
    assert outcomes == {((), 1), (("k0",), 1), (("k0", "k1"), 1), (("k0", "k1", "k2"), 0)}


def test_train_loader_stops_when_nothing_is_usable(synth: Path) -> None:
    cfg = _cfg(synth, caption_fields={"misspelt": 1.0})
    with pytest.raises(RuntimeError, match="all unusable"):
        _take(build_train_loader(cfg, str(synth / "tokenizer"), SIZE, 4, 0, 1, 0, 16), 1)


def test_skip_tally_sums_latest_snapshot_of_each_worker() -> None:
    tally = SkipTally("test", report_growth=False)
    snapshots = [(0, {"bad_image": 1}), (1, {"read_error": 1}), (0, {"bad_image": 2, "bad_json": 1}), (1, {})]
    results = [tally.absorb({"__worker__": w, "__skipped__": s})["skipped"] for w, s in snapshots]
    assert results[-1] == {"bad_image": 2, "bad_json": 1, "read_error": 1}
    assert results[1] == {"bad_image": 1, "read_error": 1}


# ------------------------------------------------------------------------------------------------------ eval loader


@pytest.mark.parametrize(("world", "max_samples", "expected_n"), [(3, 23, 21), (5, 1000, 20), (1, 24, 24), (2, 0, 0)])
def test_eval_ranks_partition_the_first_n_samples(synth: Path, world: int, max_samples: int, expected_n: int) -> None:
    order = [s["__key__"] for s in _read_shards([synth / "eval-000000.tar"])]
    cfg = _cfg(synth)
    seen: dict[int, str] = {}
    batch_counts = set()
    for rank in range(world):
        loader = build_eval_loader(cfg, str(synth / "tokenizer"), SIZE, 3, rank, world, max_samples, 32, "long")
        batches = list(loader)
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["images"].shape[1:] == (3, SIZE, SIZE) and batch["index"].dtype == torch.long
            for index, key in zip(batch["index"].tolist(), batch["keys"]):
                assert index % world == rank and index not in seen
                seen[index] = key
    assert len(batch_counts) == 1  # every rank yields the same number of batches
    assert sorted(seen) == list(range(expected_n))
    assert [seen[i] for i in range(expected_n)] == order[:expected_n]


def test_eval_worker_matches_in_process(synth: Path) -> None:
    def run(workers: int) -> list[dict]:
        cfg = _cfg(synth, num_workers=workers)
        return list(build_eval_loader(cfg, str(synth / "tokenizer"), SIZE, 5, 1, 2, 20, 32, "short"))

    in_process, with_worker = run(0), run(2)
    assert [b["keys"] for b in in_process] == [b["keys"] for b in with_worker]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(in_process, with_worker))
