"""Offline caption embeddings: the TP embedding job writes sidecars, the loaders read them back by key.

One 2-rank spawn (megatron import costs seconds) does the in-process tower work: TP=2 embedding, a restart, TP=1 x
DP=2 embedding, a TP=1 reference forward, length-bucketed vs file-order batching, and the CLI (bfloat16 by default);
the tests assert on its results. The kill test adds one CLI process that SIGKILLs itself mid-write and one 1-rank
spawn for the rerun and an uninterrupted run. Sidecar dtypes and corruption need no model.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from llm2clip_scale.config.load import expand_shards
from llm2clip_scale.config.schema import Config, DataConfig, LLMConfig, ModelConfig, ParallelConfig, TrainConfig
from llm2clip_scale.data.index import DatasetIndex, ShardEntry, write_index
from llm2clip_scale.data.loader import build_eval_loader, build_train_loader, load_tokenizer
from llm2clip_scale.data.shards import SkipCounter
from llm2clip_scale.data.sidecar import EMBEDDINGS_KEY, HEADER_MEMBER, EmbeddingDecoder, make_header, read_header
from llm2clip_scale.data.sidecar_writer import KILL_HOOK_ENV, encode_embeddings, write_sidecar
from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset
from tests.multiprocess import _free_port, run_on_ranks

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
PARAMS = SyntheticParams(train_samples=24, eval_samples=6, image_size=SIZE, samples_per_shard=6, seed=0)
FIELDS = ["raw", "short", "long"]
HIDDEN = 64
TRAIN = [f"train-{i:06d}.tar" for i in range(4)]
SHARDS = [*TRAIN, "eval-000000.tar"]


def _config(synth: Path, tp: int) -> Config:
    llm = LLMConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=256, max_seq_len=128, rotary_base=10000.0, tokenizer=str(synth / "tokenizer"), seed=7,
    )
    data = DataConfig(caption_fields={"raw": 1.0, "short": 1.0, "long": 1.0}, eval_caption_field="long",
                      max_text_len=96)
    return Config(model=ModelConfig(llm=llm), data=data, parallel=ParallelConfig(tensor_parallel=tp),
                  train=TrainConfig(precision="fp32"))


def _captions(synth: Path) -> list[tuple[str, str, str]]:
    """(key, field, caption) of every shard, read with plain webdataset (independent of the code under test)."""
    items = []
    for sample in wds.WebDataset([str(synth / s) for s in SHARDS], shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        items += [(sample["__key__"], f, meta[f].strip()) for f in FIELDS]
    return items


def _spawned(synth: str, out: str, captions: list[str]) -> dict:
    """Runs on 2 gloo ranks: TP=2 embed + restart, TP=1 x DP=2 embed, TP=1 reference, CLI."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.tower import build_text_tower

    spec = importlib.util.spec_from_file_location("embed_captions", REPO / "data_prep" / "embed_captions.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root, urls = Path(out), [str(Path(synth) / s) for s in SHARDS]
    init_distributed("gloo")
    result: dict = {}

    # TP = 2, one LLM-DP group: both ranks embed every shard, rank 0 writes. Small batches exercise batching.
    tp2 = _config(Path(synth), tp=2)
    result["first"] = cli.embed_captions(tp2, urls, root / "tp2", batch_size=5, dtype="float32")
    if dist.get_rank() == 0:
        result["mtimes"] = {p.name: p.stat().st_mtime_ns for p in (root / "tp2").iterdir()}
        (root / "tp2" / TRAIN[2]).unlink()  # an unfinished shard: the restart must redo it, and only it
    dist.barrier()
    result["restart"] = cli.embed_captions(tp2, urls, root / "tp2", batch_size=5, dtype="float32")
    if dist.get_rank() == 0:
        result["mtimes_after"] = {p.name: p.stat().st_mtime_ns for p in (root / "tp2").iterdir()}

    # TP = 1 on the same two ranks: two LLM-DP groups share the shards (i % 2).
    parallel_state.destroy_model_parallel()
    tp1 = _config(Path(synth), tp=1)
    result["dp2"] = cli.embed_captions(tp1, urls, root / "dp2", batch_size=7, dtype="float32")
    build_topology(1, 1)
    tower = build_text_tower(tp1.model.llm)
    tokenizer = load_tokenizer(tp1.model.llm.tokenizer)
    encoded = tokenizer(captions, padding="longest", truncation=True, max_length=96, return_tensors="pt")
    with torch.no_grad():  # one padded batch of everything: the plain single-tower answer
        result["reference"] = tower(encoded["input_ids"], encoded["attention_mask"]).numpy()
    # Length bucketing: the captions in file order (raw, short, long of each sample: mixed lengths), batches of 8.
    from llm2clip_scale.data.sidecar_writer import EmbedStats, embed_caption_texts

    for name, window in (("file_order", 0), ("sorted", 4096), ("sorted_window16", 16)):
        stats = EmbedStats()
        result[name] = embed_caption_texts(tower, tokenizer, captions, 96, 8, sort_window=window, stats=stats), stats

    # The CLI (float16 default) with a YAML config and an override; it shuts the process group down itself.
    parallel_state.destroy_model_parallel()
    pattern = str(Path(synth) / "train-{000000..000003}.tar")
    argv = [str(root / "tiny.yaml"), "--shards", pattern, "--out", str(root / "cli"), "parallel.tensor_parallel=2"]
    result["cli_rc"] = cli.main(argv)
    return result


def _read_sidecar(path: Path) -> tuple[dict, list[tuple[str, str, np.ndarray]]]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert members[0].name == HEADER_MEMBER
        header = json.loads(tar.extractfile(members[0]).read())
        rows = []
        for member in members[1:]:
            key, field, ext = member.name.split(".")
            assert ext == "npy"
            rows.append((key, field, np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)))
    return header, rows


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b, axis=-1).max() / np.linalg.norm(b, axis=-1).min())


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline") / "ds"
    build_synthetic_dataset(out, PARAMS)
    return out


@pytest.fixture(scope="module")
def embedded(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("sidecars")
    OmegaConf.save(OmegaConf.structured(_config(synth, tp=1)), out / "tiny.yaml")
    items = _captions(synth)
    ranks = run_on_ranks(_spawned, 2, str(synth), str(out), [c for _, _, c in items], timeout=240)
    reference = {(k, f): v for (k, f, _), v in zip(items, ranks[0]["reference"])}
    return {"out": out, "ranks": ranks, "reference": reference, "items": items}


def _decode(array: np.ndarray) -> np.ndarray:
    """A stored vector as float32, written here independently of the code under test: uint16 = bfloat16 bits."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _vectors(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(key, field) -> the float32 vector a sidecar holds (decoded from its stored dtype)."""
    return {(k, f): _decode(v) for k, f, v in _read_sidecar(path)[1]}


# ------------------------------------------------------------------------------------------------- embedding job


def test_tp2_sidecars_match_a_single_tp1_tower(embedded: dict, synth: Path) -> None:
    out, reference = embedded["out"], embedded["reference"]
    first = [r["first"] for r in embedded["ranks"]]
    expected = [str(out / "tp2" / s) for s in SHARDS]
    assert [r.writer for r in first] == [True, False]  # TP rank 0 writes; both ranks did the same shards
    assert first[0].written == first[1].written == expected and first[0].samples == 30
    assert first[0].captions == 90 and not first[0].failed and not first[0].reused
    assert sorted(p.name for p in (out / "tp2").iterdir()) == sorted(SHARDS)  # no temp files left
    for shard in SHARDS:
        header, rows = _read_sidecar(out / "tp2" / shard)
        assert header["image_shard"] == shard and header["fields"] == FIELDS
        assert header["embedding_dim"] == HIDDEN and header["dtype"] == "float32" and header["max_text_len"] == 96
        image_keys = [s["__key__"] for s in wds.WebDataset(str(synth / shard), shardshuffle=False)]
        assert [k for k, _, _ in rows] == [k for k in image_keys for _ in FIELDS]  # same keys, same order
        assert [f for _, f, _ in rows] == FIELDS * len(image_keys)
        for key, field, vector in rows:
            assert vector.dtype == np.float32 and vector.shape == (HIDDEN,)
            assert _rel_err(vector, reference[key, field]) <= 1e-5


def test_llm_data_parallel_groups_split_shards_and_agree(embedded: dict) -> None:
    out = embedded["out"]
    dp2 = [r["dp2"] for r in embedded["ranks"]]
    assert all(r.writer for r in dp2)  # TP = 1: every rank is its own group's writer
    assert dp2[0].written == [str(out / "dp2" / s) for s in SHARDS[0::2]]
    assert dp2[1].written == [str(out / "dp2" / s) for s in SHARDS[1::2]]
    for shard in SHARDS:
        ours, theirs = _vectors(out / "dp2" / shard), _vectors(out / "tp2" / shard)
        assert ours.keys() == theirs.keys()
        assert max(_rel_err(ours[k], theirs[k]) for k in ours) <= 1e-5


def test_restart_redoes_only_unfinished_shards(embedded: dict) -> None:
    out, rank0 = embedded["out"], embedded["ranks"][0]
    restart = rank0["restart"]
    assert restart.written == [str(out / "tp2" / TRAIN[2])]
    assert restart.reused == [str(out / "tp2" / s) for s in SHARDS if s != TRAIN[2]]
    before, after = rank0["mtimes"], rank0["mtimes_after"]
    assert all(after[s] == before[s] for s in SHARDS if s != TRAIN[2])  # finished sidecars were not rewritten
    assert embedded["ranks"][1]["restart"].reused == restart.reused


def test_cli_writes_bfloat16_sidecars_by_default(embedded: dict) -> None:
    out, reference = embedded["out"], embedded["reference"]
    assert [r["cli_rc"] for r in embedded["ranks"]] == [0, 0]
    assert sorted(p.name for p in (out / "cli").iterdir()) == TRAIN
    for shard in TRAIN:
        header, rows = _read_sidecar(out / "cli" / shard)
        assert header["dtype"] == "bfloat16" and header["source"]["seed"] == 7
        for key, field, vector in rows:
            # bfloat16 keeps 8 significant bits: each element within 2^-8 relative, the norm of the error too.
            assert vector.dtype == np.uint16 and _rel_err(_decode(vector), reference[key, field]) < 2**-8


def test_length_bucketing_pads_less_and_changes_no_vector(embedded: dict) -> None:
    """Sorting captions by token count before batching: fewer padded positions, the same vectors in the same order.

    fp32 throughout; padding is masked out of attention and pooling, so a caption's vector does not depend on its
    batch mates — only the GEMM shapes differ (other blocking, other summation order), a few float32 ulps: asserted
    to 1e-5 relative, as the TP comparisons above.
    """
    rank0, reference, items = embedded["ranks"][0], embedded["reference"], embedded["items"]
    (plain, plain_stats), (bucketed, stats) = rank0["file_order"], rank0["sorted"]
    windowed, window_stats = rank0["sorted_window16"]
    expected = np.stack([reference[k, f] for k, f, _ in items])
    for vectors in (plain, bucketed, windowed):
        assert vectors.shape == (len(items), HIDDEN) and _rel_err(vectors, expected) <= 1e-5
    assert _rel_err(bucketed, plain) <= 1e-5 and _rel_err(windowed, plain) <= 1e-5
    assert plain_stats.tokens == stats.tokens == window_stats.tokens > 0  # the same real tokens embedded
    assert plain_stats.captions == stats.captions == len(items) and plain_stats.batches == stats.batches
    # Mixed lengths (raw alt-text beside long dense captions, interleaved in file order): sorting cuts padding.
    assert stats.padding < window_stats.padding < plain_stats.padding, (stats, window_stats, plain_stats)


# -------------------------------------------------------------------------------------------------- offline loaders


def _data_cfg(synth: Path, sidecars: Path, **overrides: object) -> DataConfig:
    base = DataConfig(
        train_shards=str(synth / "train-{000000..000003}.tar"),
        train_embedding_shards=str(sidecars / "train-{000000..000003}.tar"),
        eval_shards=str(synth / "eval-000000.tar"),
        eval_embedding_shards=str(sidecars / "eval-000000.tar"),
        caption_fields={"raw": 1.0, "short": 2.0, "long": 1.0},
        num_workers=0,
        shuffle_buffer=8,
    )
    return replace(base, **overrides)


@pytest.mark.parametrize(("stored", "workers"), [("tp2", 0), ("tp2", 2), ("cli", 0)])
def test_offline_train_loader_yields_the_drawn_fields_vectors(
    embedded: dict, synth: Path, stored: str, workers: int
) -> None:
    """float32 sidecars (tp2) and bfloat16 ones (cli, the default): the batches hold the stored vectors exactly."""
    sidecars = embedded["out"] / stored
    vectors = {k: v for s in TRAIN for k, v in _vectors(sidecars / s).items()}
    cfg = _data_cfg(synth, sidecars, num_workers=workers)
    offline = build_train_loader(cfg, None, SIZE, 8, 0, 2, 0, 96, embedding_dim=HIDDEN)
    online = build_train_loader(replace(cfg, train_embedding_shards=None), str(synth / "tokenizer"), SIZE, 8, 0, 2, 0,
                                96)
    fields = set()
    for step, (batch, twin) in enumerate(zip(offline, online)):
        assert "input_ids" not in batch and "attention_mask" not in batch and batch["skipped"] == {}
        emb = batch["llm_embeddings"]
        assert emb.dtype == torch.float32 and emb.shape == (8, HIDDEN)
        for row, key, field in zip(emb, batch["keys"], batch["caption_fields"]):
            assert torch.equal(row, torch.from_numpy(vectors[key, field]))
        # Same seed, same draws: offline mode picks the very samples, fields and images online mode does.
        assert (batch["keys"], batch["caption_fields"]) == (twin["keys"], twin["caption_fields"])
        assert torch.equal(batch["images"], twin["images"]) and batch["captions"] == twin["captions"]
        fields.update(batch["caption_fields"])
        if step == 5:
            break
    assert fields == set(FIELDS)


def test_offline_eval_loader_partitions_with_vectors(embedded: dict, synth: Path) -> None:
    sidecars = embedded["out"] / "tp2"
    vectors = _vectors(sidecars / "eval-000000.tar")
    cfg = _data_cfg(synth, sidecars)
    seen = {}
    for rank in range(2):
        for batch in build_eval_loader(cfg, None, SIZE, 2, rank, 2, None, 96, "long", embedding_dim=HIDDEN):
            assert "input_ids" not in batch and batch["skipped"] == {}
            for index, key, row in zip(batch["index"].tolist(), batch["keys"], batch["llm_embeddings"]):
                assert torch.equal(row, torch.from_numpy(vectors[key, "long"]))
                seen[index] = key
    assert [seen[i] for i in range(6)] == [f"eval-{i:07d}" for i in range(6)]


# ------------------------------------------------------------------------------------------------ corrupt sidecars


def _random_vectors(keys: list[str], fields: list[str], dim: int) -> dict[str, dict[str, np.ndarray]]:
    gen = np.random.default_rng(0)
    return {k: {f: gen.standard_normal(dim).astype(np.float16) for f in fields} for k in keys}


def test_corrupt_sidecars_are_skipped_and_counted_exactly(
    synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [f"eval-{i:07d}" for i in range(6)]
    vecs = _random_vectors(keys, ["short", "long"], 8)
    records = [
        (keys[0], vecs[keys[0]]),
        (keys[1], {"long": vecs[keys[1]]["long"]}),  # no "short" member -> missing_embedding
        (keys[2], {"short": np.zeros(7, np.float16)}),  # wrong size -> wrong_embedding_dim
        ("eval-9999999", vecs[keys[3]]),  # key mismatch: keys[3] has no record -> missing_embedding
        (keys[5], vecs[keys[5]]),  # swapped with keys[4]: joined by key, never by position
        (keys[4], vecs[keys[4]]),
    ]
    sidecar = tmp_path / "eval-000000.tar"
    write_sidecar(sidecar, make_header("eval-000000.tar", ["short", "long"], 8, "float16", 96, None), records)
    cfg = replace(_data_cfg(synth, tmp_path), train_shards=str(synth / "eval-000000.tar"),
                  train_embedding_shards=str(sidecar), caption_fields={"short": 1.0})
    expected_skips = {"missing_embedding": 2, "wrong_embedding_dim": 1}
    for workers in (0, 1):
        with caplog.at_level(logging.WARNING, logger="llm2clip_scale.data"):
            loader = build_eval_loader(replace(cfg, num_workers=workers), None, SIZE, 4, 0, 1, None, 96, "short", 8)
            batches = list(loader)
        assert [k for b in batches for k in b["keys"]] == [keys[0], keys[4], keys[5]]
        for batch in batches:
            for key, row in zip(batch["keys"], batch["llm_embeddings"]):
                assert torch.equal(row, torch.from_numpy(vecs[key]["short"].astype(np.float32)))
        assert batches[-1]["skipped"] == loader.last_skipped == expected_skips
    # The num_workers=0 pass logs in this process (a worker logs in its own).
    message = next(r.getMessage() for r in caplog.records if "7-dim" in r.getMessage())
    assert str(sidecar) in message and "but 8 are expected" in message

    train = build_train_loader(cfg, None, SIZE, 3, 0, 1, 0, 96, embedding_dim=8)
    batches = []
    for batch in train:
        batches.append(batch)
        if len(batches) == 6:
            break
    assert {k for b in batches for k in b["keys"]} <= {keys[0], keys[4], keys[5]}
    assert set(batches[-1]["skipped"]) == set(expected_skips)


def test_truncated_sidecar_counts_one_read_error_and_each_lost_sample(synth: Path, tmp_path: Path) -> None:
    keys = [f"eval-{i:07d}" for i in range(6)]
    vecs = _random_vectors(keys, ["long"], 8)
    whole = tmp_path / "whole.tar"
    write_sidecar(whole, make_header("eval-000000.tar", ["long"], 8, "float16", 96, None), vecs.items())
    data = whole.read_bytes()
    cut = tmp_path / "eval-000000.tar"
    cut.write_bytes(data[: data.index(f"{keys[3]}.long.npy".encode())])  # keys[2] is being read when it breaks
    loader = build_eval_loader(_data_cfg(synth, tmp_path), None, SIZE, 4, 0, 1, None, 96, "long", 8)
    assert [k for b in loader for k in b["keys"]] == keys[:2]
    assert loader.last_skipped == {"sidecar_read_error": 1, "missing_embedding": 4}


def test_offline_config_errors(synth: Path, tmp_path: Path) -> None:
    cfg = _data_cfg(synth, tmp_path, train_embedding_shards=str(tmp_path / "train-{000000..000002}.tar"))
    with pytest.raises(ValueError, match="3 sidecar shards for 4 image shards"):
        build_train_loader(cfg, None, SIZE, 4, 0, 1, 0, 96, embedding_dim=8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_eval_loader(replace(cfg, eval_embedding_shards=None), None, SIZE, 4, 0, 1, None, 96, "long")


def test_sidecar_write_is_atomic(tmp_path: Path) -> None:
    def records():
        yield "k0", {"short": np.ones(4, np.float32)}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_sidecar(tmp_path / "x.tar", make_header("x.tar", ["short"], 4, "float32", 8, None), records())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- stored dtypes


def _known_vectors() -> np.ndarray:
    """float32 rows that exercise rounding: random values, exact ties, just-above-tie values, extremes."""
    gen = np.random.default_rng(3)
    tie = np.float32(1 + 2**-8)  # halfway between two bfloat16 values: rounds to even (1.0), truncation agrees
    above = np.float32(1 + 2**-8 + 2**-20)  # just above a tie: rounds up; truncating the low 16 bits would not
    special = np.array([tie, above, -above, 1 / 3, 0.0, -0.0, 3e-30, 6e4, -1e-3, 255.5, 2**-14, 1.0], np.float32)
    return np.stack([gen.standard_normal(12).astype(np.float32), special, 100 * gen.standard_normal(12)
                     .astype(np.float32)])


def _decode_member(payload: bytes, dim: int) -> torch.Tensor | None:
    skips = SkipCounter("dtype test")
    decoded = EmbeddingDecoder(dim, "dtype test")({"__key__": "k", EMBEDDINGS_KEY: {"f": payload}}, "f", skips)
    assert not skips.counts, skips.counts
    return decoded


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_each_stored_dtype_round_trips_to_float32(dtype: str, tmp_path: Path) -> None:
    """write_sidecar + the loaders' decoder: float32 back, equal to torch's own rounding of the vector, exactly."""
    vectors = _known_vectors()
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    expected = torch.from_numpy(vectors).to(torch_dtype).float()
    stored = encode_embeddings(vectors, dtype)
    assert stored.dtype == {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
    keys = [f"s{i}" for i in range(len(vectors))]
    path = tmp_path / "x.tar"
    write_sidecar(path, make_header("x.tar", ["f"], 12, dtype, 8, None), [(k, {"f": v}) for k, v in zip(keys, stored)])
    header = read_header(path)
    assert header["dtype"] == dtype and header["format"] == 1
    with tarfile.open(path) as tar:
        payloads = {m.name: tar.extractfile(m).read() for m in tar.getmembers()[1:]}
    for row, key in enumerate(keys):
        decoded = _decode_member(payloads[f"{key}.f.npy"], 12)
        assert decoded.dtype == torch.float32 and torch.equal(decoded, expected[row]), (dtype, row)
        assert np.array_equal(_decode(np.load(io.BytesIO(payloads[f"{key}.f.npy"]))), expected[row].numpy())
    if dtype == "bfloat16":  # round to nearest even, as torch does; not truncation of the low bits
        assert expected[1, 0] == 1 and expected[1, 1] == 1 + 2**-7 and expected[1, 2] == -(1 + 2**-7)


def test_a_float16_sidecar_of_the_first_format_still_reads(synth: Path, tmp_path: Path) -> None:
    """Bytes as the writer before bfloat16 made them (format 1, float16 npy members), built here by hand: the loader
    decodes them, and a rerun with --dtype float16 finds its header current (no re-embedding)."""
    keys = [f"eval-{i:07d}" for i in range(6)]
    gen = np.random.default_rng(5)
    vectors = {k: gen.standard_normal(8).astype(np.float16) for k in keys}
    header = {"format": 1, "image_shard": "eval-000000.tar", "fields": ["long"], "embedding_dim": 8,
              "dtype": "float16", "max_text_len": 96, "source": {"seed": 7}}
    path = tmp_path / "eval-000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [(HEADER_MEMBER, json.dumps(header, sort_keys=True).encode()),
                              *((f"{k}.long.npy", _npy(vectors[k])) for k in keys)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert read_header(path) == make_header("eval-000000.tar", ["long"], 8, "float16", 96, {"seed": 7})
    loader = build_eval_loader(_data_cfg(synth, tmp_path), None, SIZE, 4, 0, 1, None, 96, "long", 8)
    rows = {k: row for b in loader for k, row in zip(b["keys"], b["llm_embeddings"])}
    assert list(rows) == keys and loader.last_skipped == {}
    for key, row in rows.items():
        assert row.dtype == torch.float32 and torch.equal(row, torch.from_numpy(vectors[key].astype(np.float32)))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- kill and rerun

KILLED_AFTER = 2  # the killed run dies while writing its third sidecar


def _rerun_and_reference(config: str, index: str, killed: str, fresh: str) -> dict:
    """One process: the CLI rerun over the killed run's directory, then an uninterrupted CLI run into a fresh one."""
    spec = importlib.util.spec_from_file_location("embed_captions", REPO / "data_prep" / "embed_captions.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("llm2clip_scale.data").addHandler(handler)
    args = ["--batch-size", "4"]
    result = {"rerun": cli.main([config, "--shards", index, "--out", killed, *args]), "rerun_log": list(messages)}
    os.environ["MASTER_PORT"] = str(_free_port())  # main shut its process group down; the next one starts anew
    result["fresh"] = cli.main([config, "--shards", index, "--out", fresh, *args])
    return result


def test_a_killed_run_leaves_no_partial_sidecar_and_the_rerun_finishes_it(synth: Path, tmp_path: Path) -> None:
    """A real SIGKILL of the CLI mid-run, placed by a test hook (LLM2CLIP_SCALE_TEST_SIGKILL_AFTER_SIDECARS: the
    process kills itself while writing its third sidecar, after that file's header and first record are on disk),
    so the kill lands mid-write every time instead of racing a fast run. Shards come from a dataset index."""
    config, index = tmp_path / "tiny.yaml", tmp_path / "data" / "index.json"
    OmegaConf.save(OmegaConf.structured(_config(synth, tp=1)), config)
    index.parent.mkdir()
    write_index(index, DatasetIndex([ShardEntry(str(synth / s), 6, (synth / s).stat().st_size) for s in TRAIN]))
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    env = {**os.environ, KILL_HOOK_ENV: str(KILLED_AFTER), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "embed_captions.py"), str(config), "--shards",
                           str(index), "--out", str(killed), "--batch-size", "4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    # What the kill left: the finished sidecars under their names, the one being written only as a hidden temporary
    # file — whose header is already there, so only the name says "complete", and nothing reads that name.
    done = TRAIN[:KILLED_AFTER]
    assert sorted(p.name for p in killed.glob("*.tar")) == done
    temps = [p for p in killed.iterdir() if p.name not in done]
    assert [p.name.split(".tmp-")[0] for p in temps] == [f".{TRAIN[KILLED_AFTER]}"]
    assert read_header(temps[0])["image_shard"] == TRAIN[KILLED_AFTER]
    assert temps[0].stat().st_size < (killed / done[0]).stat().st_size  # partial
    assert expand_shards(str(killed / "*.tar")) == [str(killed / s) for s in done]
    before = {s: ((killed / s).stat().st_ino, (killed / s).stat().st_mtime_ns) for s in done}

    result = run_on_ranks(_rerun_and_reference, 1, str(config), str(index), str(killed), str(fresh), timeout=300)[0]
    assert result["rerun"] == 0 and result["fresh"] == 0
    assert any("temporary file(s) of killed runs" in m for m in result["rerun_log"]), result["rerun_log"]
    written = [m for m in result["rerun_log"] if "] " in m and " samples, " in m]  # one line per sidecar written
    assert [m.split("] ")[1].split(":")[0] for m in written] == [str(killed / s) for s in TRAIN[KILLED_AFTER:]]
    # The finished sidecars were left alone (same file, not rewritten) ...
    assert {s: ((killed / s).stat().st_ino, (killed / s).stat().st_mtime_ns) for s in done} == before
    # ... and the resumed directory holds exactly what an uninterrupted run writes, byte for byte.
    assert sorted(p.name for p in killed.glob("*.tar")) == sorted(p.name for p in fresh.iterdir()) == TRAIN
    for shard in TRAIN:
        assert (killed / shard).read_bytes() == (fresh / shard).read_bytes(), shard
