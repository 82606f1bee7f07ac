"""data_prep/validate_shards.py: a data set with planted defects in known places is reported exactly, per shard and
reason; a clean one passes --strict. Shards are tiny (8x8 JPEGs, 8-wide float16 vectors), written here by hand."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip_scale.data import shard_check
from llm2clip_scale.data.index import DatasetIndex, ShardEntry, write_index
from llm2clip_scale.data.shards import SkipCounter, read_shard
from llm2clip_scale.data.sidecar import EmbeddingDecoder, make_header, read_paired_shards
from llm2clip_scale.data.sidecar_writer import encode_embeddings, write_sidecar
from tests.conftest import REPO, load_script

vs = load_script("validate_shards")

FIELDS = ("raw", "short")
DIM = 8
SAMPLES = 10
SHARDS = 9


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _caption_json(key: str, short: str | None = None) -> bytes:
    return json.dumps({"raw": f"raw caption {key}", "short": f"short {key}" if short is None else short}).encode()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))


def _cut(path: Path, member: str, inside: bool = True) -> None:
    """Truncate a tar in the middle of ``member``'s data (inside) or right before its header."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + max(info.size // 2, 1) if inside else info.offset)


def _vectors(i: int, fields: tuple[str, ...] = FIELDS) -> dict[str, np.ndarray]:
    return {name: np.full(DIM, i + 0.5 * j, dtype=np.float16) for j, name in enumerate(fields)}


def _sidecar(path: Path, image_name: str, records: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    write_sidecar(path, make_header(image_name, FIELDS, DIM, "float16", 16, {"test": True}), records)


def _clean_shard(folder: Path, s: int) -> tuple[str, list[str]]:
    """Shard ``s`` as a builder writes it: SAMPLES samples with both captions, and its sidecar."""
    name = f"train-{s:06d}.tar"
    keys = [f"s{s}_{i:03d}" for i in range(SAMPLES)]
    members = [m for i, k in enumerate(keys) for m in ((f"{k}.jpg", _jpeg(i)), (f"{k}.json", _caption_json(k)))]
    _write_tar(folder / "img" / name, members)
    _sidecar(folder / "side" / name, name, [(k, _vectors(i)) for i, k in enumerate(keys)])
    return name, keys


def _index(folder: Path, samples: dict[str, int] | None = None) -> Path:
    names = sorted(p.name for p in (folder / "img").glob("*.tar"))
    samples = samples or {}
    entries = [ShardEntry(n, samples.get(n, SAMPLES), (folder / "img" / n).stat().st_size) for n in names]
    write_index(folder / "img" / "index.json", DatasetIndex(entries, {f: SAMPLES * len(names) for f in FIELDS}))
    return folder / "img" / "index.json"


# Planted defects: shard name -> {reason: count}. train-000007 stays clean.
EXPECTED = {
    "train-000000.tar": {"bad_image": 2, "empty_image": 1, "missing_image": 1},
    "train-000001.tar": {"truncated": 1, "size_mismatch": 1},
    "train-000002.tar": {"duplicate_key": 1, "bad_json": 1, "missing_caption": 1, "missing_caption:short": 1},
    "train-000003.tar": {"sample_count_mismatch": 1, "sidecar_order": 1, "missing_embedding": 2,
                         "orphan_embedding": 1, "wrong_embedding_dim": 1, "bad_embedding": 1},
    "train-000004.tar": {"sidecar_mismatch": 1, "duplicate_embedding": 1},
    "train-000005.tar": {"sidecar_read_error": 1, "missing_embedding": 4},
    "train-000006.tar": {"read_error": 1},
    "train-000007.tar": {},
    "train-000008.tar": {"bad_sidecar_header": 1},
}
SAMPLES_READ = {"train-000001.tar": 3, "train-000006.tar": 0}  # the others: SAMPLES


@pytest.fixture(scope="module")
def defective(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("defective")
    (root / "img").mkdir()
    (root / "side").mkdir()
    for s in range(SHARDS):
        _clean_shard(root, s)
    img, side = root / "img", root / "side"

    # 0: two corrupt images (garbage; a JPEG that opens but does not decode), one 0-byte image, one sample without.
    members = []
    for i in range(SAMPLES):
        k = f"s0_{i:03d}"
        image = {1: b"not an image at all", 4: _jpeg(4)[:-2], 6: b""}.get(i, _jpeg(i))
        members += ([] if i == 8 else [(f"{k}.jpg", image)]) + [(f"{k}.json", _caption_json(k))]
    _write_tar(img / "train-000000.tar", members)

    # 2: sample 7 repeats sample 2's key; 3 has bad json, 5 no json, 8 a blank short caption. Its sidecar as
    # embed_captions writes it: no record without a usable json, one record per key.
    members, records = [], {}
    for i in range(SAMPLES):
        k = "s2_002" if i == 7 else f"s2_{i:03d}"
        members.append((f"{k}.jpg", _jpeg(i)))
        if i == 3:
            members.append((f"{k}.json", b"{not json"))
        elif i != 5:
            members.append((f"{k}.json", _caption_json(k, short="  " if i == 8 else None)))
        if i not in (3, 5):
            records.setdefault(k, _vectors(i, ("raw",) if i == 8 else FIELDS))
    _write_tar(img / "train-000002.tar", members)
    _sidecar(side / "train-000002.tar", "train-000002.tar", list(records.items()))

    # 3 (the index will say 12 samples): sidecar with records 4 and 5 swapped, 2 missing, 7 without its short
    # vector, an orphan at the end, a 7-wide raw vector in record 0, a NaN short vector in record 8.
    records = [(f"s3_{i:03d}", _vectors(i)) for i in range(SAMPLES)]
    del records[7][1]["short"]
    records[4], records[5] = records[5], records[4]
    records[0][1]["raw"] = np.zeros(DIM - 1, dtype=np.float16)  # first: no reader may take its width as the norm
    records[8][1]["short"] = np.full(DIM, np.nan, dtype=np.float16)
    del records[2]
    records.append(("s3_orphan", _vectors(99)))
    _sidecar(side / "train-000003.tar", "train-000003.tar", records)

    # 4: a sidecar made for another image shard (same records, one twice); its sample 9 reuses a key of shard 0.
    members = [(n.replace("s4_009", "s0_005"), p) for n, p in _tar_members(img / "train-000004.tar")]
    _write_tar(img / "train-000004.tar", members)
    keys = [f"s4_{i:03d}" for i in range(9)] + ["s0_005"]
    records = [(k, _vectors(i)) for i, k in enumerate(keys)]
    _sidecar(side / "train-000004.tar", "train-000099.tar", [*records, records[3]])

    # 8: a sidecar without its header (records as written).
    _write_tar(side / "train-000008.tar", [(n, p) for n, p in _tar_members(side / "train-000008.tar")
                                           if n != "__sidecar__"])

    index = _index(root, {"train-000003.tar": 12})  # sizes before the damage below

    # 1: cut inside sample 3's json: samples 0-2 read, 7 lost. 5: sidecar cut inside record 6's second vector:
    # records 0-5 read, samples 6-9 lack embeddings. 6: listed in the index, gone.
    _cut(img / "train-000001.tar", "s1_003.json")
    _cut(side / "train-000005.tar", "s5_006.short.npy")
    (img / "train-000006.tar").unlink()
    assert index.is_file()
    return root


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    (root / "img").mkdir()
    (root / "side").mkdir()
    for s in range(3):
        _clean_shard(root, s)
    _index(root)
    return root


def _run(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    rc = vs.main([*argv, "--json", str(report), "--no-progress"])
    out = capsys.readouterr().out
    return rc, json.loads(report.read_text()), out


def _findings(report: dict) -> dict[str, dict[str, int]]:
    return {Path(s["shard"]).name: s["findings"] for s in report["shards"]}


def test_out_of_order_counts_records_to_move() -> None:
    assert shard_check._out_of_order([]) == (0, 0)
    assert shard_check._out_of_order([0, 1, 2, 3]) == (0, 0)
    assert shard_check._out_of_order([0, 2, 1, 3]) == (1, 1)  # a swapped pair: one record moves
    assert shard_check._out_of_order([4, 0, 1, 2, 3]) == (1, 4)  # one record from the end to the front
    assert shard_check._out_of_order([3, 2, 1, 0]) == (3, 3)


def test_clean_dataset_passes_strict(clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(clean / "img" / "index.json"), "--embeddings", str(clean / "side"), "--fields", "raw,short",
            "--embedding-dim", str(DIM), "--global-keys", "--strict"]
    rc, report, out = _run(argv, tmp_path, capsys)
    assert rc == 0
    assert report["summary"]["ok"] and report["summary"]["findings"] == {}
    assert report["summary"]["samples"] == report["summary"]["expected_samples"] == 3 * SAMPLES
    assert [s["samples"] for s in report["shards"]] == [SAMPLES] * 3
    assert all(s["details"] == {"sidecar_embedding_dim": DIM} for s in report["shards"])  # sidecars were read
    assert out.strip() == f"OK: 3 shards, {3 * SAMPLES} samples of {3 * SAMPLES} indexed, no findings"


def test_planted_defects_are_counted_exactly(defective: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(defective / "img" / "index.json"), "--embeddings", str(defective / "side"), "--fields", "raw,short"]
    rc, report, out = _run([*argv, "--workers", "1"], tmp_path, capsys)
    assert rc == 0  # findings, but not --strict
    assert _findings(report) == EXPECTED
    by_name = {Path(s["shard"]).name: s for s in report["shards"]}
    assert {n: s["samples"] for n, s in by_name.items()} == {n: SAMPLES_READ.get(n, SAMPLES) for n in EXPECTED}
    assert by_name["train-000001.tar"]["details"]["read"] == 3
    assert by_name["train-000001.tar"]["details"]["lost"] == 7
    assert by_name["train-000003.tar"]["expected"] == 12
    assert by_name["train-000006.tar"]["details"]["lost"] == SAMPLES
    assert by_name["train-000005.tar"]["details"]["sidecar_records_read"] == 6
    examples = by_name["train-000000.tar"]["examples"]
    assert (examples["bad_image"], examples["empty_image"], examples["missing_image"]) == (
        ["s0_001", "s0_004"], ["s0_006"], ["s0_008"])
    assert by_name["train-000003.tar"]["examples"]["orphan_embedding"] == ["s3_orphan"]
    assert by_name["train-000003.tar"]["examples"]["missing_embedding"] == ["s3_002", "s3_007"]
    summary = report["summary"]
    assert summary["lost_samples"] == 7 + SAMPLES and summary["damaged_shards_loss_unknown"] == 0
    flagged = [n for n, counts in EXPECTED.items() if counts]
    assert summary["shards_with_findings"] == len(flagged) == SHARDS - 1
    totals: dict[str, int] = {}
    for counts in EXPECTED.values():
        for reason, count in counts.items():
            totals[reason] = totals.get(reason, 0) + count
    assert summary["findings"] == totals
    read, indexed = SAMPLES * SHARDS - 7 - SAMPLES, SAMPLES * SHARDS + 2
    assert (summary["samples"], summary["expected_samples"]) == (read, indexed)
    # The table: one row per shard with findings (the clean one absent) with its counts, a total row, one row per
    # reason, the verdict.
    lines = out.strip().splitlines()
    assert lines[0].split() == ["shard", "samples", "expected", "findings"]
    rows = {line.split()[0]: line.split()[3:] for line in lines[1 : 1 + len(flagged)]}
    assert list(rows) == flagged
    assert {name: dict(item.split("=") for item in cells if "=" in item) for name, cells in rows.items()} == {
        name: {reason: str(count) for reason, count in EXPECTED[name].items()} for name in flagged}
    assert lines[2].endswith("truncated=1 size_mismatch=1 (3 read before the damage, 7 lost)")
    assert lines[1 + len(flagged)].split() == ["total", str(read), str(indexed), str(sum(totals.values())),
                                               "findings", "in", str(len(flagged)), "shard(s)"]
    by_reason = {line.split()[0]: line.split()[1:3] for line in lines[4 + len(flagged) : -1]}
    assert by_reason == {reason: [str(count), str(sum(reason in c for c in EXPECTED.values()))]
                         for reason, count in totals.items()}
    assert lines[-1] == (f"FINDINGS: {len(flagged)} of {SHARDS} shards, {sum(totals.values())} findings; {read} "
                         f"samples of {indexed} indexed; 17 samples lost to damage")

    assert vs.main([*argv, "--strict", "--no-progress"]) == 1


def test_two_workers_and_global_keys(defective: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(defective / "img" / "index.json"), "--embeddings", str(defective / "side"), "--fields", "raw,short",
            "--workers", "2", "--global-keys"]
    rc, report, _ = _run(argv, tmp_path, capsys)
    assert rc == 0
    expected = {n: dict(c) for n, c in EXPECTED.items()}
    expected["train-000004.tar"]["duplicate_key_global"] = 1  # s0_005, first held by train-000000
    assert _findings(report) == expected
    assert [Path(s["shard"]).name for s in report["shards"]] == list(EXPECTED)  # shard order kept


def test_sidecar_pattern_pairs_like_the_directory(defective: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(defective / "side" / f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    argv = [str(defective / "img" / "index.json"), "--embeddings", pattern, "--fields", "raw,short"]
    _, report, _ = _run(argv, tmp_path, capsys)
    assert _findings(report) == EXPECTED


def test_planted_sidecar_defects_are_what_the_loader_skips(defective: Path) -> None:
    """The loader's own join and decoder over shard 3, per field, see the defects the validator counts."""
    source = {"url": str(defective / "img" / "train-000003.tar"), "sidecar": str(defective / "side" /
                                                                                "train-000003.tar")}
    seen = {}
    for field in FIELDS:
        skips = SkipCounter("test")
        decoder = EmbeddingDecoder(DIM, "test")
        good = sum(decoder(sample, field, skips) is not None for sample in read_paired_shards([source], skips))
        seen[field] = (good, skips.counts)
    assert seen == {"raw": (8, {"missing_embedding": 1, "wrong_embedding_dim": 1}),
                    "short": (7, {"missing_embedding": 2, "bad_embedding": 1})}


def test_damage_without_index_leaves_the_loss_unknown(defective: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, report, out = _run([str(defective / "img" / "train-00000[01].tar"), "--strict"], tmp_path, capsys)
    assert rc == 1
    assert _findings(report) == {"train-000000.tar": EXPECTED["train-000000.tar"], "train-000001.tar": {"truncated": 1}}
    assert report["shards"][1]["details"]["lost"] is None and report["shards"][1]["expected"] is None
    assert "truncated=1 (3 read before the damage, loss unknown: no index)" in out
    assert out.splitlines()[-1] == ("FINDINGS: 2 of 2 shards, 5 findings; 13 samples; loss unknown in 1 damaged "
                                    "shard(s) without an index")


def test_a_cut_between_samples_loses_the_one_being_read(defective: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Cut right before sample 3's header: samples 0-2 are whole in the file, but a reader cannot know sample 2
    ended, so the loader drops it with the damage; the validator counts what the loader gets."""
    shard = tmp_path / "train-000001.tar"
    shutil.copy(defective / "img" / "train-000007.tar", shard)
    _cut(shard, "s7_003.jpg", inside=False)
    assert len(list(read_shard(str(shard), SkipCounter("test")))) == 2
    _, report, _ = _run([str(shard)], tmp_path, capsys)
    assert report["shards"][0]["findings"] == {"truncated": 1}
    assert report["shards"][0]["samples"] == report["shards"][0]["details"]["read"] == 2


def test_embedding_dim_option(clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(clean / "img" / "index.json"), "--embeddings", str(clean / "side"), "--embedding-dim", str(DIM - 1)]
    rc, report, _ = _run([*argv, "--strict"], tmp_path, capsys)
    assert rc == 1
    assert _findings(report) == {f"train-{s:06d}.tar": {"sidecar_dim_mismatch": 1, "wrong_embedding_dim": SAMPLES}
                                 for s in range(3)}


def test_caption_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --fields a sample needs some non-blank string; with --fields, every listed field."""
    metas = [{"raw": "a cat", "short": "cat"}, {"raw": "  ", "url": 3}, {"short": "a dog"}, {"raw": "", "short": ""}]
    members = [m for i, meta in enumerate(metas)
               for m in ((f"k{i}.png", _png()), (f"k{i}.json", json.dumps(meta).encode()))]
    shard = tmp_path / "captions.tar"
    _write_tar(shard, members)
    _, report, _ = _run([str(shard)], tmp_path, capsys)
    assert report["shards"][0]["findings"] == {"missing_caption": 2}
    _, report, _ = _run([str(shard), "--fields", "raw,short"], tmp_path, capsys)
    assert report["shards"][0]["findings"] == {"missing_caption:raw": 3, "missing_caption:short": 2}
    assert report["shards"][0]["examples"]["missing_caption:raw"] == ["k1", "k2", "k3"]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_usage_errors_exit_2(defective: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = defective / "img"
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    cases = [
        [str(tmp_path / "nothing-*.tar")],  # a glob matching nothing
        [str(tmp_path / "train-{000000..000003}.tar")],  # names that do not exist
        [str(tmp_path / "missing" / "index.json")],
        [str(tmp_path / "bad.json")],
        [str(img / "index.json"), "--embeddings", str(defective / "side" / "train-00000[0-3].tar")],  # 4 for 9
        [str(img / "index.json"), "--embeddings", str(tmp_path / "none-*.tar")],
        [str(img / "index.json"), "--fields", "raw,,short"],
        [str(img / "index.json"), "--embedding-dim", "0"],
        [str(img / "index.json"), "--workers", "0"],
        [str(img / "index.json"), "--no-such-option"],
    ]
    for argv in cases:
        assert vs.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "matches no shards" in err and f"4 sidecar shards for {SHARDS} image shards" in err


def test_command_line(defective: Path) -> None:
    script = REPO / "data_prep" / "validate_shards.py"
    run = [sys.executable, str(script), str(defective / "img" / "index.json"), "--embeddings",
           str(defective / "side"), "--fields", "raw,short", "--workers", "2", "--strict"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"FINDINGS: {SHARDS - 1} of {SHARDS} shards, 26 findings")
    assert "shard/s" in done.stderr  # the progress bar and the rate line


def test_bfloat16_sidecars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bfloat16 storage (uint16 bit patterns) decodes through the sidecar module: clean vectors pass, a NaN is found."""
    (tmp_path / "img").mkdir()
    name, keys = _clean_shard(tmp_path, 0)
    records = [(k, {f: encode_embeddings(v.astype(np.float32), "bfloat16") for f, v in _vectors(i).items()})
               for i, k in enumerate(keys)]
    records[3][1]["short"] = encode_embeddings(np.full(DIM, np.nan, dtype=np.float32), "bfloat16")
    assert records[0][1]["raw"].dtype == np.uint16
    write_sidecar(tmp_path / "side" / name, make_header(name, FIELDS, DIM, "bfloat16", 16, None), records)
    argv = [str(tmp_path / "img" / name), "--embeddings", str(tmp_path / "side"), "--embedding-dim", str(DIM)]
    _, report, _ = _run(argv, tmp_path, capsys)
    assert report["shards"][0]["findings"] == {"bad_embedding": 1}
    assert report["shards"][0]["examples"]["bad_embedding"] == ["s0_003"]
