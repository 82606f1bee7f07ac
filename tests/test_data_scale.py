"""tools/data_scale.py: the arithmetic behind docs/SCALE.md, checked against what the code really does (its vision
FLOPs come from llm2clip_scale/metrics/flops.py, checked in tests/test_flops.py)."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("data_scale", REPO / "tools" / "data_scale.py")
data_scale = importlib.util.module_from_spec(_spec)
sys.modules["data_scale"] = data_scale
_spec.loader.exec_module(data_scale)


def test_tar_member_bytes_equal_a_real_tar(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    sizes = [0, 1, 511, 512, 513, 128 + 4096 * 2, 7]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"k{i}.npy")
            info.size = size
            tar.addfile(info, io.BytesIO(b"\0" * size))
    with tarfile.open(path) as tar:
        offsets = [member.offset for member in tar.getmembers()]
    assert [b - a for a, b in zip(offsets, offsets[1:])] == [data_scale.tar_member_bytes(s) for s in sizes[:-1]]
    npy = io.BytesIO()
    numpy.save(npy, numpy.zeros(4096, dtype=numpy.uint16))  # a sidecar member: 2-byte values, 1-D
    assert data_scale.sidecar_bytes_per_caption(4096, 2) == data_scale.tar_member_bytes(len(npy.getvalue())) == 9216


def test_report_prints_every_table() -> None:
    text = data_scale.report(data_scale.parse_args(["--images", "1e6", "--vision", "vit_tiny_patch16_224"]))
    for title in ("### Image shards", "### Embedding cache (4096-wide)", "### Online vs offline"):
        assert title in text
    assert "100 of 10,000 samples" in text
