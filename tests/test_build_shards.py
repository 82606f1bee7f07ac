"""data_prep/build_shards.py: manifests (parquet with paths or bytes, jsonl, csv) -> webdataset shards + index.

Read back with the loaders' own shard reader: keys, captions, sizes and pixels match the manifest; planted bad rows
are counted exactly by reason; a SIGKILLed build restarts to the bytes of an uninterrupted one; --part slices add
up to the full build; the index feeds expand_shards and the eval loader; the sbatch array script builds its part.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llm2clip_scale.data import manifests as manifests_module
from llm2clip_scale.data.index import read_index
from llm2clip_scale.data.shard_build import encode_image
from llm2clip_scale.data.shards import SkipCounter, read_shard
from tests.conftest import REPO, load_script

SCRIPT = REPO / "data_prep" / "build_shards.py"
SIZES = [(64, 48), (48, 96)]  # alternate landscape / portrait originals
# --max-size 32: shorter side to 32, longer side scaled and rounded half up: 64x48 -> 42.67 -> 43x32; 48x96 -> 32x64
RESIZED = {(64, 48): (43, 32), (48, 96): (32, 64)}
CAPTIONS = "raw=alt,short=short_caption,long=long_caption"
SMALL = ["--max-size", "32", "--captions", CAPTIONS, "--workers", "1"]


@pytest.fixture(scope="module")
def bs():
    return load_script("build_shards")


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 200 + 20, i * 91 % 200 + 20, i * 53 % 200 + 20)


def _image_bytes(i: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", SIZES[i % 2], _colour(i)).save(out, format=fmt, quality=95)
    return out.getvalue()


def _rows(root: Path, n: int, start: int = 0) -> list[dict]:
    """Good rows: an image file per row (PNG and JPEG alternately), captions with some blank optional fields."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        fmt = "PNG" if i % 3 else "JPEG"
        path = f"img/{i}.{fmt.lower()}"
        (root / path).write_bytes(_image_bytes(i, fmt))
        rows.append({"id": f"k{i:04d}", "image": path, "alt": f" alt text {i} ",
                     "short_caption": f"short {i}" if i % 4 else "  ",
                     "long_caption": f"a long caption, with a comma, for {i}" if i % 5 else None,
                     "url": f"https://example.org/{i}.jpg" if i % 2 else None})
    return rows


def _write(root: Path, name: str, rows: list[dict], bytes_column: bool = False) -> Path:
    path = root / name
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    else:
        if bytes_column:
            rows = [{**r, "image": (root / r["image"]).read_bytes()} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    return path


def _read(path: Path) -> list[dict]:
    skips = SkipCounter("test")
    samples = list(read_shard(str(path), skips))
    assert skips.counts == {}, f"{path} does not read cleanly: {skips.counts}"
    return samples


def _read_dataset(out: Path) -> dict[str, list[dict]]:
    """Every shard of ``out`` as {name: [{key, meta, size, mean}]}, in order."""
    result = {}
    for path in sorted(out.glob("*.tar")):
        entries = []
        for sample in _read(path):
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                rgb = image.convert("RGB")
                pixels = list(rgb.getdata())
                mean = tuple(sum(p[c] for p in pixels) / len(pixels) for c in range(3))
                entries.append({"key": sample["__key__"], "meta": json.loads(sample["json"]), "size": rgb.size,
                                "mean": mean})
            assert set(sample) == {"__key__", "__url__", "jpg", "json"}
        result[path.name] = entries
    return result


def _expected_meta(row: dict, with_url: bool = False) -> dict:
    meta = {"width": SIZES[int(row["id"][1:]) % 2][0], "height": SIZES[int(row["id"][1:]) % 2][1]}
    for field, column in (("raw", "alt"), ("short", "short_caption"), ("long", "long_caption")):
        if row[column] and row[column].strip():
            meta[field] = row[column].strip()
    if with_url and row["url"]:
        meta["url"] = row["url"]
    return meta


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


# ---------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", ["parquet_paths", "parquet_bytes", "jsonl", "csv"])
def test_each_manifest_format_round_trips_through_the_shard_reader(tmp_path: Path, bs, kind: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifests_module, "_PARQUET_BATCH", 3)  # batches inside row groups of 7, shards crossing both
    rows = _rows(tmp_path, 40)
    name = {"parquet_paths": "m.parquet", "parquet_bytes": "m.parquet", "jsonl": "m.jsonl", "csv": "m.csv"}[kind]
    manifest = _write(tmp_path, name, rows, bytes_column=kind == "parquet_bytes")
    key_args = ["--key-column", "id"] if kind in ("parquet_bytes", "csv") else []
    out = tmp_path / "out"
    assert bs.main([str(manifest), "--out", str(out), "--samples-per-shard", "16", "--meta-columns", "url", *SMALL,
                    *key_args]) == 0

    shards = _read_dataset(out)
    assert list(shards) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # 16 + 16 + 8 rows
    row_of = {}
    for number, row in enumerate(rows):
        row_of[row["id"] if key_args else f"{number:09d}"] = (number, row)
    seen = []
    for shard, entries in shards.items():
        for entry in entries:
            number, row = row_of[entry["key"]]
            assert number // 16 == int(shard[6:12])  # row i lives in shard i // S
            assert entry["meta"] == _expected_meta(row, with_url=True)
            assert entry["size"] == RESIZED[SIZES[number % 2]]
            assert all(abs(m - c) < 8 for m, c in zip(entry["mean"], _colour(number))), (entry["key"], entry["mean"])
            seen.append(number)
    assert seen == list(range(40))  # every row, in manifest order

    index = read_index(out / "index.json")
    assert [(s.name, s.samples, s.bytes) for s in index.shards] == [
        (name, len(entries), (out / name).stat().st_size) for name, entries in shards.items()]
    metas = [e["meta"] for entries in shards.values() for e in entries]
    assert index.caption_fields == {f: sum(f in m for m in metas) for f in ("raw", "short", "long")}
    assert index.caption_fields["short"] < 40 and index.caption_fields["long"] < 40  # blanks left out
    assert index.skipped == {} and index.extra["rows"] == 40 and index.extra["manifests"] == [name]
    for name, entries in shards.items():
        stats = json.loads((out / name.replace(".tar", ".stats.json")).read_text())
        assert stats["samples"] == len(entries) and stats["skipped"] == {}


def test_exif_orientation_is_applied_and_small_images_are_not_upscaled(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 32, 48))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait, blue on top
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    jpeg, width, height = encode_image(buffer.getvalue(), 32, 95)
    assert (width, height) == (48, 64)
    with Image.open(io.BytesIO(jpeg)) as out:
        assert out.size == (32, 43)
        top, bottom = out.getpixel((16, 5)), out.getpixel((16, 38))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2]
    small, width, height = encode_image(_image_bytes(0, "PNG"), 512, 95)
    assert (width, height) == (64, 48) and Image.open(io.BytesIO(small)).size == (64, 48)


# --------------------------------------------------------------------------------------------------- bad rows


def test_bad_rows_are_counted_by_reason_and_good_rows_all_arrive(tmp_path: Path, bs) -> None:
    good = _rows(tmp_path, 30)
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 4)
    jpeg = _image_bytes(3, "JPEG")
    expected: dict[int, str] = {}  # global row -> reason
    lines: list[str] = []

    def add(entry, reason: str | None = None) -> None:
        if reason:
            expected[len(lines)] = reason
        lines.append(entry)

    # jsonl: rows 0-11 (shard 0 = rows 0-7, shard 1 = rows 8-15)
    add(good[0])
    add({**good[1], "image": "img/nowhere.png"}, "missing_image")
    add({**good[2], "alt": "  ", "short_caption": "", "long_caption": None}, "missing_caption")
    add('{"id": "k9999", "image": "img/1.png", "alt": ', "bad_row")
    add(good[4])
    add("[1, 2]", "bad_row")
    add({**good[6], "id": "k.0006"}, "bad_key")
    add({**good[7], "id": good[4]["id"]}, "bad_key")  # a duplicate of row 4's key, in the same shard
    add({**good[8], "image": "img/corrupt.jpg"}, "bad_image")
    add({**good[9], "image": None}, "missing_image")
    add({**good[10], "image": ""}, "missing_image")
    add(good[11])
    jsonl_rows = len(lines)
    text = "".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in lines)
    (tmp_path / "a.jsonl").write_text(text.replace("\n", "\n\n", 1))  # a blank line is not a row
    # csv: rows 12-24; rows 16-23 are exactly shard 2 and all bad, so it ends up empty
    lines.clear()
    csv_rows = [
        ({**good[12], "alt": "two lines,\nquoted"}, None),
        ("k0013,img/13.png", "bad_row"),  # too few cells
        ({**good[14], "image": "img/missing.jpg"}, "missing_image"),
        (good[15], None),
        *[({**good[i], "alt": "", "short_caption": " ", "long_caption": ""}, "missing_caption") for i in range(16, 20)],
        *[({**good[i], "image": "img/nope.png"}, "missing_image") for i in range(20, 23)],
        ({**good[23], "id": ""}, "bad_key"),
        (good[24], None),
    ]
    with open(tmp_path / "b.csv", "w", newline="") as handle:
        handle.write("id,image,alt,short_caption,long_caption,url\r\n")
        writer = csv.writer(handle)
        for number, (row, reason) in enumerate(csv_rows, start=jsonl_rows):
            if reason:
                expected[number] = reason
            if number == jsonl_rows + 2:
                handle.write("\r\n")  # a blank line is not a row here either
            if isinstance(row, str):
                handle.write(row + "\r\n")
            else:
                writer.writerow(["" if row[c] is None else row[c] for c in list(good[0])])
    # parquet with image bytes: rows 25-29
    start = jsonl_rows + len(csv_rows)
    table_rows = [{**good[25], "image": jpeg}, {**good[26], "image": b"garbage bytes"},
                  {**good[27], "image": None}, {**good[28], "image": jpeg[: len(jpeg) // 2]},
                  {**good[29], "image": jpeg}]
    expected.update({start + 1: "bad_image", start + 2: "missing_image", start + 3: "bad_image"})
    pq.write_table(pa.Table.from_pylist(table_rows), tmp_path / "c.parquet", row_group_size=2)

    out = tmp_path / "out"
    manifests = [str(tmp_path / n) for n in ("a.jsonl", "b.csv", "c.parquet")]
    assert bs.main([*manifests, "--out", str(out), "--samples-per-shard", "8", "--key-column", "id", *SMALL]) == 0

    total = start + len(table_rows)
    by_shard: dict[int, dict[str, int]] = {}
    for number, reason in expected.items():
        counts = by_shard.setdefault(number // 8, {})
        counts[reason] = counts.get(reason, 0) + 1
    totals: dict[str, int] = {}
    for reason in expected.values():
        totals[reason] = totals.get(reason, 0) + 1
    index = read_index(out / "index.json")
    assert index.skipped == totals
    assert set(totals) == {"bad_row", "bad_key", "missing_caption", "missing_image", "bad_image"}
    for shard in range(-(-total // 8)):
        stats = json.loads((out / f"train-{shard:06d}.stats.json").read_text())
        assert stats["skipped"] == by_shard.get(shard, {}), shard
        first, last = stats["rows"]
        assert (first, last) == (shard * 8, min(total, shard * 8 + 8))
        assert stats["samples"] + sum(stats["skipped"].values()) == last - first  # every row accounted for once

    # shard 2 holds no sample: left out of the index, listed as empty, still a valid (empty) tar on disk
    assert [s.name for s in index.shards] == ["train-000000.tar", "train-000001.tar", "train-000003.tar"]
    assert index.extra["empty_shards"] == ["train-000002.tar"] and _read(out / "train-000002.tar") == []
    got = {e["key"]: e["meta"] for entries in _read_dataset(out).values() for e in entries}
    good_numbers = [n for n in range(total) if n not in expected]
    assert sorted(got) == sorted(good[n]["id"] for n in good_numbers) and index.samples == len(good_numbers)
    assert got["k0012"]["raw"] == "two lines,\nquoted"  # a quoted csv newline stays inside its row
    assert got["k0004"] == _expected_meta(good[4])


def test_unusable_manifests_and_changed_settings_exit_2_naming_the_problem(tmp_path: Path, bs, capsys) -> None:
    manifest = _write(tmp_path, "m.csv", _rows(tmp_path, 6))
    out = tmp_path / "out"
    assert bs.main([str(tmp_path / "absent.parquet"), "--out", str(out)]) == 2
    assert "absent.parquet" in capsys.readouterr().err
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert bs.main([str(tmp_path / "broken.parquet"), "--out", str(out)]) == 2
    assert "broken.parquet" in capsys.readouterr().err
    assert bs.main([str(manifest), "--out", str(out), "--captions", "raw=nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert bs.main([str(manifest), "--out", str(out), "--samples-per-shard", "4", *SMALL]) == 0
    capsys.readouterr()
    (out / "train-000001.tar").unlink()
    assert bs.main([str(manifest), "--out", str(out), "--samples-per-shard", "4", *SMALL[2:], "--max-size", "24"]) == 2
    assert "max_size" in capsys.readouterr().err and not (out / "train-000001.tar").exists()


# ---------------------------------------------------------------------------------------------------- restart


def test_a_killed_build_restarts_to_the_bytes_of_an_uninterrupted_one(tmp_path: Path, bs, capsys) -> None:
    manifest = _write(tmp_path, "m.parquet", _rows(tmp_path, 60))
    args = [str(manifest), "--samples-per-shard", "10", *SMALL]
    reference = tmp_path / "reference"
    assert bs.main([*args, "--out", str(reference)]) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--out", str(out)], stderr=subprocess.DEVNULL,
                            env={**os.environ, "LLM2CLIP_BUILD_SHARDS_TEST_ROW_DELAY": "0.02"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once a shard is finished and the next one is half written
        names = [p.name for p in out.iterdir()] if out.is_dir() else []
        if any(n.endswith(".tar") and not n.startswith(".") for n in names) and any(".tmp-" in n for n in names):
            break
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    finished = sorted(p for p in out.glob("*.tar"))
    assert 1 <= len(finished) < 6 and list(out.glob(".*.tmp-*"))
    kept = {}
    for path in finished:  # anything that looks complete is complete: it reads cleanly and has its stats
        stats = json.loads(path.with_name(path.name.replace(".tar", ".stats.json")).read_text())
        assert len(_read(path)) == stats["samples"] == 10 and stats["bytes"] == path.stat().st_size
        kept[path.name] = (path.stat().st_ino, path.stat().st_mtime_ns)
    assert not (out / "index.json").exists()

    capsys.readouterr()
    assert bs.main([*args, "--out", str(out)]) == 0
    assert f"{len(kept)} finished and kept" in capsys.readouterr().err
    assert {n: (out / n).stat().st_ino for n in kept} == {n: ino for n, (ino, _) in kept.items()}
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == {n: mtime for n, (_, mtime) in kept.items()}
    assert _tree(out) == _tree(reference)  # no stale temporary file left, every byte as uninterrupted


def test_parts_built_separately_equal_one_full_build_and_the_index_waits_for_all(tmp_path: Path, bs) -> None:
    rows = _rows(tmp_path, 56)
    manifests = [str(_write(tmp_path, "a.jsonl", rows[:20])), str(_write(tmp_path, "b.csv", rows[20:]))]
    args = [*manifests, "--samples-per-shard", "8", "--max-size", "32", "--captions", CAPTIONS]
    full = tmp_path / "full"
    assert bs.main([*args, "--out", str(full), "--workers", "1"]) == 0
    out = tmp_path / "out"
    # part 0 of 2 in a subprocess with a pool of 2 workers; part 1 here, inline
    done = _cli(*args, "--out", str(out), "--part", "0/2", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]  # 7 shards: 3 + 4
    assert not (out / "index.json").exists() and "4 shard(s) unfinished" in done.stderr
    assert bs.main([*args, "--out", str(out), "--part", "1/2", "--workers", "1"]) == 0
    assert _tree(out) == _tree(full)
    assert read_index(out / "index.json").samples == 56

    # --index-only rebuilds the same index from the stats alone, and refuses an incomplete set
    (out / "index.json").unlink()
    assert bs.main(["--out", str(out), "--index-only"]) == 0
    assert _tree(out) == _tree(full)
    (out / "train-000004.tar").unlink()
    assert bs.main(["--out", str(out), "--index-only"]) == 1 and not (out / "index.json").exists()


# ---------------------------------------------------------------------------------------------- the consumers


def test_the_index_feeds_expand_shards_and_the_eval_loader(tmp_path: Path, bs) -> None:
    from llm2clip_scale.config.load import expand_shards
    from llm2clip_scale.config.schema import DataConfig
    from llm2clip_scale.data.loader import build_eval_loader
    from llm2clip_scale.data.synthetic import train_tokenizer

    rows = _rows(tmp_path, 20)
    rows[8:12] = [{**r, "image": "img/none.png"} for r in rows[8:12]]  # shard 2 of 5 is empty: not in the index
    manifest = _write(tmp_path, "m.jsonl", rows)
    out = tmp_path / "out"
    assert bs.main([str(manifest), "--out", str(out), "--samples-per-shard", "4", *SMALL]) == 0
    urls = expand_shards(str(out / "index.json"))
    assert urls == [str(out / f"train-{i:06d}.tar") for i in (0, 1, 3, 4)]

    train_tokenizer([f"alt text {i}" for i in range(20)], tmp_path / "tokenizer")
    loader = build_eval_loader(DataConfig(eval_shards=str(out / "index.json"), num_workers=0),
                               str(tmp_path / "tokenizer"), 32, 4, 0, 1, None, 16, "raw")
    batches = list(loader)
    good = [i for i in range(20) if not 8 <= i < 12]
    assert [k for b in batches for k in b["keys"]] == [f"{i:09d}" for i in good]
    assert [c for b in batches for c in b["captions"]] == [f"alt text {i}" for i in good]
    assert batches[0]["images"].shape[1:] == (3, 32, 32)


def test_the_sbatch_array_script_builds_its_part(tmp_path: Path) -> None:
    script = REPO / "slurm" / "build_shards.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    rows = _rows(tmp_path, 40)
    manifests = [_write(tmp_path, "a.jsonl", rows[:15]), _write(tmp_path, "b.parquet", rows[15:])]
    out = tmp_path / "out"
    env = {**os.environ, "MANIFESTS": "::".join(str(m) for m in manifests), "OUT": str(out), "PY": sys.executable,
           "BUILD_ARGS": f"--samples-per-shard 10 --max-size 32 --captions {CAPTIONS}",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000002.tar", "train-000003.tar"]
    assert not (out / "index.json").exists()
    # task 0 as Slurm runs it: a copy of the script in a spool directory, the repository as the submit directory;
    # an array numbered from 1 (SLURM_ARRAY_TASK_MIN) and space-separated manifests
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(script, spool / "slurm_script")
    env.update(MANIFESTS=" ".join(str(m) for m in manifests), SLURM_SUBMIT_DIR=str(REPO), SLURM_ARRAY_TASK_ID="1",
               SLURM_ARRAY_TASK_MIN="1")
    done = subprocess.run(["bash", str(spool / "slurm_script")], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    index = read_index(out / "index.json")
    assert [s.name for s in index.shards] == [f"train-{i:06d}.tar" for i in range(4)] and index.samples == 40
