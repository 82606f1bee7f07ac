"""Stage-1 caption pairs split over LLM data-parallel ranks: each rank reads only its shards and its byte range of
every pair file, the ranks together read every pair of the source exactly once (and count every skip once), and a
rank's batch stream resumes exactly. Single process: the stream of rank r of W is called directly."""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from llm2clip_scale.config.schema import Config
from llm2clip_scale.data import pair_files as pair_files_module
from llm2clip_scale.data import pairs as pairs_module
from llm2clip_scale.data.pair_files import byte_range, read_pair_file, read_pair_range
from llm2clip_scale.data.pair_stream import PairBatches
from llm2clip_scale.data.pairs import CaptionPair, iter_caption_pairs, shard_source
from llm2clip_scale.data.shards import SkipCounter
from tests.pair_batches import collate_groups, take

NUM_SHARDS = 5


def _sample(shard: int, i: int, extra: str = "") -> dict:
    meta = {"short": f"shape {shard} {i}", "long": f"a long caption of shape {shard} number {i}{extra}",
            "raw": f"raw text {shard} {i}"}
    return {"__key__": f"s{shard}-{i:03d}", "json": json.dumps(meta).encode()}


def _write_shard(path: Path, shard: int, good: int) -> None:
    bad = [{"__key__": f"s{shard}-bad-json", "json": b"{nope"},
           {"__key__": f"s{shard}-one-field", "json": json.dumps({"short": "only short"}).encode()}]
    samples = [_sample(shard, i) for i in range(good)]
    samples[2:2] = bad[: 1 + shard % 2]  # 1 or 2 bad samples per shard
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _jsonl_lines(n: int, seed: int = 0) -> list[str]:
    """Lines of very different lengths (so byte boundaries fall inside lines), blank lines and bad lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        padding = " and more" * rng.randrange(0, 25)
        record = {"query": f"query {i}", "positive": f"positive {i}{padding}"}
        if i % 4 == 0:
            record["negative"] = f"given negative {i}"
        lines.append(json.dumps(record))
        if i % 7 == 3:
            lines.append("")  # blank: not a row
        if i % 11 == 5:
            lines.append("{broken json" + "x" * rng.randrange(0, 80))  # bad_json
        if i % 13 == 6:
            lines.append(json.dumps({"query": "no positive"}))  # missing_caption
    return lines


def _csv_text(n: int) -> str:
    rows = ["query,positive,negative"]
    for i in range(n):
        rows.append(f'csv query {i},"a positive, with a comma {i}",' + (f"csv negative {i}" if i % 3 else ""))
        if i % 9 == 4:
            rows.append("too,many,cells,here")  # bad_row
        if i % 10 == 7:
            rows.append("   ")  # blank: not a row
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("split_source")
    tars = []
    for shard in range(NUM_SHARDS):
        tars.append(out / f"pairs-{shard:06d}.tar")
        _write_shard(tars[-1], shard, good=6 + shard)
    jsonl = out / "pairs.jsonl"
    jsonl.write_text("\n".join(_jsonl_lines(60)) + "\n")
    csv_path = out / "pairs.csv"
    csv_path.write_text(_csv_text(30))
    # Pair files between the shards: the source order mixes both kinds.
    return {"tars": [str(t) for t in tars], "jsonl": str(jsonl), "csv": str(csv_path),
            "all": shard_source([tars[0], tars[1], jsonl, *tars[2:], csv_path])}


class _Reads:
    """Counts the bytes each opened pair file hands out (readline/read) and records the shards read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes: Counter[str] = Counter()
        self.shards: list[str] = []
        real_open, real_read_shards = open, pairs_module.read_shards
        reads = self

        class Counting(io.BufferedReader):
            def readline(self, size: int = -1) -> bytes:
                line = super().readline(size)
                reads.bytes[self.name] += len(line)
                return line

            def read(self, size: int = -1) -> bytes:
                data = super().read(size)
                reads.bytes[self.name] += len(data)
                return data

        def counting_open(name: str, mode: str = "r", *args: object, **kwargs: object):
            assert mode == "rb", mode
            return Counting(real_open(name, "rb", buffering=0))

        def recording_read_shards(sources, skips):
            for source in sources:
                reads.shards.append(source["url"])
                yield from real_read_shards([source], skips)

        monkeypatch.setattr(pair_files_module, "open", counting_open, raising=False)
        monkeypatch.setattr(pairs_module, "read_shards", recording_read_shards)


def _pairs(source: str, rank: int, world: int, **kwargs: object) -> tuple[list[CaptionPair], dict[str, int]]:
    skips = SkipCounter(f"rank {rank} of {world}")
    kwargs = {"hard_negatives": False, "seed": 5, **kwargs}
    return list(iter_caption_pairs(source, skips, rank=rank, world_size=world, **kwargs)), skips.counts


def _add(counts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


# ---------------------------------------------------------------------------------------------- the split itself


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_read_disjoint_shares_that_make_up_the_source(source: dict, world: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    reference, reference_skips = _pairs(source["all"], 0, 1)
    # Sanity of the reference: every good pair of every kind, every kind of skip.
    assert len(reference) == sum(6 + s for s in range(NUM_SHARDS)) + 60 + 30
    assert set(reference_skips) == {"bad_json", "missing_caption", "bad_row"}
    shares, counts = [], []
    for rank in range(world):
        reads = _Reads(monkeypatch)
        pairs, skips = _pairs(source["all"], rank, world)
        shares.append(pairs)
        counts.append(skips)
        # Only this rank's shards are opened ...
        assert reads.shards == source["tars"][rank::world]
        # ... and about this rank's byte range of each pair file (plus the lines across its ends, the csv header).
        for path in (source["jsonl"], source["csv"]):
            text = Path(path).read_bytes()
            start, end = byte_range(len(text), rank, world)
            longest = max(len(line) for line in text.splitlines(keepends=True))
            header = len(text.splitlines(keepends=True)[0]) if path.endswith(".csv") else 0
            assert 0 < reads.bytes[path] <= end - start + 2 * longest + header, (path, rank)
            assert world == 1 or reads.bytes[path] < 0.5 * len(text) + 2 * longest + header
    together = Counter(pair for share in shares for pair in share)
    assert together == Counter(reference)  # every pair once: disjoint, complete, the same pairs as one reader's
    assert all(shares)
    assert _add(counts) == reference_skips  # every skip counted by one rank only
    # Directions are a property of the sample, not of the split: the random ones are not all one way.
    assert {p.query_field for p in reference if p.query_field} == {"short", "long"}


def test_hard_negatives_come_from_the_ranks_own_share(source: dict) -> None:
    groups = []
    for rank in range(3):
        pairs, _ = _pairs(source["all"], rank, 3, hard_negatives=True)
        assert all(p.negative is not None for p in pairs)
        groups += [p.group for p in pairs]
    reference, _ = _pairs(source["all"], 0, 1)
    assert Counter(groups) == Counter(p.group for p in reference)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_every_byte_split_of_a_pair_file_reads_each_line_once(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(("\r\n".join(_jsonl_lines(12, seed=1)) + "\n").encode())  # CRLF ends as well
    else:
        path.write_text(_csv_text(12).rstrip("\n"))  # no newline at the end
    size = path.stat().st_size
    whole_skips = SkipCounter("whole")
    whole = list(read_pair_range(path, whole_skips))
    assert len(whole) == 12 and whole_skips.counts
    # Every number of parts up to one per byte: boundaries at line starts, inside lines, inside the csv header.
    for parts in [*range(2, 40), size // 2, size + 3]:
        counts, together = [], []
        for part in range(parts):
            skips = SkipCounter("part")
            together += read_pair_range(path, skips, part, parts)
            counts.append(skips.counts)
        assert together == whole, parts  # in file order, too
        assert _add(counts) == whole_skips.counts, parts
    # The group is the byte offset of the line, so it names the row whatever the split.
    first = whole[0]
    assert first.group == f"{path}@{len(path.read_bytes().splitlines(keepends=True)[0]) if suffix == '.csv' else 0}"


def test_csv_header_problems_and_unreadable_files_count_once(tmp_path: Path) -> None:
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("q,p\n" + "a,b\n" * 20)
    missing = tmp_path / "absent.jsonl"
    for path in (bad_header, missing):
        counts = []
        for part in range(4):
            skips = SkipCounter("part")
            assert list(read_pair_range(path, skips, part, 4)) == []
            counts.append(skips.counts)
        assert _add(counts) == {"read_error": 1}, path


def test_csv_cells_spanning_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('query,positive\na cat,"a small cat"\na dog,"a dog\nlying down"\na bird,a bird in a tree\n')
    skips = SkipCounter("quoted")
    pairs = list(read_pair_range(path, skips))
    assert [p.query for p in pairs] == ["a cat", "a bird"]
    assert skips.counts == {"quoted_newline": 2}  # the line opening the cell and the one closing it
    # CRA's whole-file reader (deal=True) is the same reader: it skips such a row too.
    whole_skips = SkipCounter("whole")
    assert list(read_pair_file(path, whole_skips)) == pairs and whole_skips.counts == skips.counts


# ------------------------------------------------------------------------------------------ fewer shards than ranks


def test_one_shard_on_four_ranks_is_dealt_and_logged(source: dict, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    one = source["tars"][4]  # 10 good samples, 1 bad
    mixed = shard_source([one, source["jsonl"]])
    for src in (one, mixed):
        reference, reference_skips = _pairs(src, 0, 1)
        with caplog.at_level(logging.WARNING, logger="llm2clip_scale.data"):
            shares = [_pairs(src, rank, 4) for rank in range(4)]
        assert Counter(p for share, _ in shares for p in share) == Counter(reference)
        assert _add([skips for _, skips in shares]) == reference_skips
        from_shard = [[p for p in share if "@" not in p.group] for share, _ in shares]
        assert [len(s) for s in from_shard] == [3, 3, 2, 2]  # every rank gets pairs of the one shard
    assert sum("1 tar shard(s) for 4 data-parallel ranks" in r.getMessage() for r in caplog.records) == 1
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(Path(one).read_bytes()[:1500])
    counts = [_pairs(str(damaged), rank, 4)[1] for rank in range(4)]
    assert _add(counts) == _pairs(str(damaged), 0, 1)[1] and _add(counts)["read_error"] == 1


# ---------------------------------------------------------------------------------------------- the batch stream


def _cfg(src: str) -> Config:
    cfg = Config()
    cfg.data.train_shards = src
    cfg.data.shuffle_buffer = 12
    cfg.train.global_batch = 8
    cfg.train.seed = 3
    return cfg


def test_replicas_read_the_same_batches_and_resume_exactly(source: dict) -> None:
    cfg = _cfg(source["all"])
    rank, world = 1, 2  # 4 pairs per batch
    reference = PairBatches(cfg, collate_groups, rank, world, SkipCounter("reference"))
    stream = iter(reference)
    first = take(stream, 40)  # past the end of the first epoch (~50 pairs on this rank)
    assert reference.epoch >= 1
    # Another TP/PP rank of the same replica: the same LLM-DP coordinates, the same batches.
    twin = iter(PairBatches(cfg, collate_groups, rank, world, SkipCounter("twin")))
    assert take(twin, 40) == first
    other = iter(PairBatches(cfg, collate_groups, 0, world, SkipCounter("other")))
    assert not {g for b in take(other, 5) for g in b["groups"]} & {g for b in first[:5] for g in b["groups"]}

    for k in (3, 14, 16, 30):  # inside the first epoch, around its end, inside the second
        interrupted = PairBatches(cfg, collate_groups, rank, world, SkipCounter("interrupted"))
        assert take(iter(interrupted), k) == first[:k]
        state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint keeps
        resumed = PairBatches(cfg, collate_groups, rank, world, SkipCounter("resumed"))
        resumed.load_state_dict(state)
        assert take(iter(resumed), 6) == first[k : k + 6], k
        assert resumed.skips.counts == _counts_after(cfg, rank, world, k + 6), k
    with pytest.raises(ValueError, match="same split"):
        PairBatches(cfg, collate_groups, 0, 4, SkipCounter("x")).load_state_dict(state)


def _counts_after(cfg: Config, rank: int, world: int, batches: int) -> dict[str, int]:
    """Skip counts of an uninterrupted stream after ``batches`` batches."""
    stream = PairBatches(cfg, collate_groups, rank, world, SkipCounter("uninterrupted"))
    take(iter(stream), batches)
    return stream.skips.counts


# ------------------------------------------------------------------------------------------ CRA keeps its dealing


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_pairs_are_the_first_pairs_of_the_source_dealt_in_order(source: dict, world: int) -> None:
    first_n = 37
    whole, _ = _pairs(source["all"], 0, 1, deal=True, random_direction=False)
    mine = [_pairs(source["all"], rank, world, deal=True, random_direction=False)[0][
        : len(range(rank, first_n, world))] for rank in range(world)]
    assert sorted((p for share in mine for p in share), key=whole.index) == whole[:first_n]
    for rank, share in enumerate(mine):
        assert share == whole[rank:first_n:world]
    # Pair files are read whole by training's parser: the same pairs, grouped by the byte offset of their line.
    from_files = [*read_pair_file(source["jsonl"], SkipCounter("j")), *read_pair_file(source["csv"], SkipCounter("c"))]
    assert [p for p in whole if "@" in p.group] == from_files and from_files[0].group == f"{source['jsonl']}@0"
    assert all(p.query_field == "short" and p.positive_field == "long" for p in whole if p.query_field)
