"""The gathered local-loss InfoNCE equals the single-process loss over the concatenated global batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2clip_scale.losses.contrastive import clip_loss
from tests.multiprocess import run_on_ranks

LOCAL_BATCH, DIM, SCALE = 4, 8, 20.0


def _global_features(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(world_size * LOCAL_BATCH, DIM, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(world_size * LOCAL_BATCH, DIM, generator=gen), dim=-1)
    return images, texts


def _reference(world_size: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    images, texts = _global_features(world_size)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    loss = clip_loss(images, texts, torch.tensor(SCALE))
    loss.backward()
    return loss.item(), images.grad, texts.grad


def _distributed(world_size: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    rank = dist.get_rank()
    images, texts = _global_features(world_size)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local_images = images[rows].clone().requires_grad_(True)
    local_texts = texts[rows].clone().requires_grad_(True)
    loss = clip_loss(local_images, local_texts, torch.tensor(SCALE))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    # Data-parallel training averages over ranks, so the global-batch loss is the mean of the local losses
    # and its gradient is the local gradient divided by the world size.
    return (mean_loss / world_size).item(), local_images.grad / world_size, local_texts.grad / world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_gathered_loss_equals_global_batch_loss(world_size: int) -> None:
    ref_loss, ref_image_grad, ref_text_grad = _reference(world_size)
    results = run_on_ranks(_distributed, world_size, world_size)
    for rank, (loss, image_grad, text_grad) in enumerate(results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        torch.testing.assert_close(image_grad, ref_image_grad[rows], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(text_grad, ref_text_grad[rows], rtol=1e-6, atol=1e-7)
    assert ref_image_grad.abs().sum() > 0  # the comparison is not between zeros


def test_loss_is_low_for_aligned_features() -> None:
    images, _ = _global_features(2)
    aligned = clip_loss(images, images, torch.tensor(SCALE)).item()
    shuffled = clip_loss(images, images.roll(1, dims=0), torch.tensor(SCALE)).item()
    assert aligned < 0.1 < shuffled
