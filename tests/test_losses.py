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


def _uneven_gather_gradients(iterations: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch.distributed as dist

    from llm2clip_scale.distributed.collectives import all_gather_rows, sum_to_row_owners
    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for step in range(iterations):  # repeated: the gather's backward runs many times in one process, as in training
        local = torch.randn(rank + 1, DIM, generator=torch.Generator().manual_seed(100 * step + rank))
        local.requires_grad_(True)
        gathered, offset = all_gather_rows(local, differentiable=True)
        weights = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(1000 * step + rank))
        (gathered * weights).sum().backward()
        assert offset == sum(range(1, rank + 1)) and gathered.shape[0] == sum(range(1, world + 1))
        results.append((gathered.detach(), local.grad))
    # Both ways of summing the gradient to its owner (NCCL's reduce-scatter, gloo's all-reduce) agree exactly.
    blocks = torch.randn(2 * world, DIM, generator=torch.Generator().manual_seed(rank))
    via_reduce_scatter = sum_to_row_owners(blocks, None, reduce_scatter=True)
    via_all_reduce = sum_to_row_owners(blocks, None, reduce_scatter=False)
    results.append((via_reduce_scatter, via_all_reduce))
    return results


def test_differentiable_gather_of_uneven_rows_sends_each_row_its_summed_gradient() -> None:
    """Rank r holds r+1 rows and weighs the gathered rows by its own weights: each row's gradient is the sum of the
    weights every rank gave it, and the gathered rows are every rank's rows in rank order (exact)."""
    world, iterations = 3, 20
    results = run_on_ranks(_uneven_gather_gradients, world, iterations)
    for step in range(iterations):
        rows = torch.cat([torch.randn(r + 1, DIM, generator=torch.Generator().manual_seed(100 * step + r))
                          for r in range(world)])
        weight_sum = sum(torch.randn(rows.shape, generator=torch.Generator().manual_seed(1000 * step + r))
                         for r in range(world))
        for rank in range(world):
            gathered, grad = results[rank][step]
            torch.testing.assert_close(gathered, rows, rtol=0, atol=0)
            start = sum(range(1, rank + 1))
            torch.testing.assert_close(grad, weight_sum[start:start + rank + 1], rtol=1e-6, atol=1e-7)
    blocks = sum(torch.randn(2 * world, DIM, generator=torch.Generator().manual_seed(r)) for r in range(world))
    for rank in range(world):
        via_reduce_scatter, via_all_reduce = results[rank][iterations]
        torch.testing.assert_close(via_reduce_scatter, via_all_reduce, rtol=0, atol=0)
        torch.testing.assert_close(via_all_reduce, blocks[2 * rank:2 * rank + 2], rtol=1e-6, atol=1e-7)
