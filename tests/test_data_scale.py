"""tools/data_scale.py: the arithmetic behind docs/SCALE.md, checked against what the code really does."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("data_scale", REPO / "tools" / "data_scale.py")
data_scale = importlib.util.module_from_spec(_spec)
sys.modules["data_scale"] = data_scale
_spec.loader.exec_module(data_scale)


@pytest.mark.parametrize("name,size", [("vit_tiny_patch16_224", 64), ("vit_small_patch14_dinov2", 56)])
def test_vision_flops_match_torch_flop_counter(name: str, size: int) -> None:
    formula, params, tokens = data_scale.vision_flops_per_image(name, size)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size).eval()
    assert params == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    measured = counter.get_total_flops()
    # The formula counts every parameter as a matmul weight (norms, biases and position embeddings are a few percent
    # of a small ViT's parameters, far less of ViT-E's) and attention as 4·L·T²·d, as the counter does.
    assert measured <= formula <= 1.10 * measured, (formula, measured)


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
