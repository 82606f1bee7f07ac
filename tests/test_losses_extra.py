"""SigLIP ring loss, tiled InfoNCE and ProCLIP distillation losses against direct single-process references.

Distributed checks follow tests/test_losses.py: data-parallel training averages over ranks, so the global-batch loss is
the mean of the local losses and each local gradient (features, logit_scale, logit_bias) divided by the world size,
or all-reduced and divided for the shared scalars, must equal the gradient of the global-batch loss.
All multi-rank scenarios of one world size run in a single spawn (a module-scoped fixture) to keep the file fast.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llm2clip_scale.losses import LOSS_NAMES, build_contrastive_loss, clip_loss
from llm2clip_scale.losses.proclip import instance_loss, self_distillation_loss, structure_loss
from llm2clip_scale.losses.siglip import siglip_loss
from llm2clip_scale.losses.tiled import tiled_clip_loss
from tests.multiprocess import run_on_ranks

LOCAL_BATCH, DIM, SCALE, BIAS = 4, 8, 10.0, -5.0
UNEVEN_BATCHES = (3, 5)  # per-rank batch sizes of the 2-rank uneven SigLIP and tiled InfoNCE scenarios
UNEVEN_TILES = (2, 64)  # row tiles of the uneven tiled scenario: tails on both ranks; one tile above the batch
NARROW_DIM = 3  # feature width of the saved-tensor check, below every world batch
DIST_TILE = 3  # does not divide the gathered batch of either world size
RTOL, ATOL = 1e-5, 1e-7


def _features(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(rows, DIM, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(rows, DIM, generator=gen), dim=-1)
    return images, texts


def _direct_siglip(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SigLIP paper's formula, written out over the full pair matrix."""
    logits = scale * images @ texts.T + bias
    labels = 2 * torch.eye(images.shape[0]) - 1
    return -F.logsigmoid(labels * logits).sum() / images.shape[0]


def _leaf(value: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.full(shape, value, requires_grad=True)


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def _assert_close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=RTOL, atol=ATOL)


def _saved_shapes(fn: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while ``fn()`` builds its graph."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


# ----------------------------------------------------------------------------------------------- multi-rank scenarios


def _rank_scenarios(world_size: int) -> dict[str, Any]:
    """Everything the distributed tests need from one rank, computed in one process group."""
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    rank = dist.get_rank()
    images, texts = _features(world_size * LOCAL_BATCH)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    out: dict[str, Any] = {}

    def averaged(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / world_size

    # SigLIP over the ring, equal local batches.
    local_images = images[rows].clone().requires_grad_(True)
    local_texts = texts[rows].clone().requires_grad_(True)
    scale, bias = _leaf(SCALE), _leaf(BIAS, (1,))
    loss = siglip_loss(local_images, local_texts, scale, bias)
    image_grad, text_grad, scale_grad, bias_grad = _grads(loss, local_images, local_texts, scale, bias)
    out["siglip"] = (
        averaged(loss).item(), image_grad / world_size, text_grad / world_size, averaged(scale_grad),
        averaged(bias_grad),
    )

    # Through build_contrastive_loss and a non-default process group spanning all ranks in reverse order, so group
    # ranks differ from global ranks and the ring's peer translation is exercised.
    reversed_group = dist.new_group(list(reversed(range(world_size))))
    local_images = images[rows].clone().requires_grad_(True)
    local_texts = texts[rows].clone().requires_grad_(True)
    group_loss = build_contrastive_loss("siglip")(local_images, local_texts, torch.tensor(SCALE),
                                                  torch.tensor(BIAS), group=reversed_group)
    out["siglip_group"] = (averaged(group_loss).item(), *_grads(group_loss, local_images, local_texts))

    # Tiled InfoNCE with a tile that does not divide the gathered batch, and clip_loss on the same rank.
    for name, fn in (("tiled", lambda i, t, s: tiled_clip_loss(i, t, s, tile_size=DIST_TILE)), ("clip", clip_loss)):
        local_images = images[rows].clone().requires_grad_(True)
        local_texts = texts[rows].clone().requires_grad_(True)
        scale = _leaf(SCALE)
        loss = fn(local_images, local_texts, scale)
        image_grad, text_grad, scale_grad = _grads(loss, local_images, local_texts, scale)
        out[name] = (averaged(loss).item(), image_grad / world_size, text_grad / world_size, averaged(scale_grad))
    # A feature width below the world batch, so a saved b x B tensor cannot be mistaken for a b x dim one.
    out["tiled_saved_shapes"] = _saved_shapes(
        lambda: tiled_clip_loss(
            images[rows, :NARROW_DIM].clone().requires_grad_(True),
            texts[rows, :NARROW_DIM].clone().requires_grad_(True),
            _leaf(SCALE),
            tile_size=DIST_TILE,
        )
    )

    if world_size == 2:
        # Uneven local batches: the mean of local losses is no longer the global loss, but the size-weighted sum
        # is the summed global pair loss, whose gradient every rank's share must reproduce.
        uneven_images, uneven_texts = _features(sum(UNEVEN_BATCHES), seed=1)
        start = sum(UNEVEN_BATCHES[:rank])
        part = slice(start, start + UNEVEN_BATCHES[rank])
        local_images = uneven_images[part].clone().requires_grad_(True)
        local_texts = uneven_texts[part].clone().requires_grad_(True)
        scale, bias = _leaf(SCALE), _leaf(BIAS)
        weighted = siglip_loss(local_images, local_texts, scale, bias) * UNEVEN_BATCHES[rank]
        image_grad, text_grad, scale_grad, bias_grad = _grads(weighted, local_images, local_texts, scale, bias)
        out["siglip_uneven"] = (
            averaged(weighted).item() * world_size, image_grad, text_grad,
            averaged(scale_grad) * world_size, averaged(bias_grad) * world_size,
        )
        # Tiled InfoNCE over the same uneven batches: rank 1's rows start at offset 3, not rank * local rows; tiles
        # of 2 rows leave a 1-row tail on both ranks and a tile above the local batch is one partial tile.
        for tile in UNEVEN_TILES:
            local_images = uneven_images[part].clone().requires_grad_(True)
            local_texts = uneven_texts[part].clone().requires_grad_(True)
            scale = _leaf(SCALE)
            # Each local loss is a mean over its rows, so weighting by the row count sums to the global summed loss.
            weighted = tiled_clip_loss(local_images, local_texts, scale, tile_size=tile) * UNEVEN_BATCHES[rank]
            image_grad, text_grad, scale_grad = _grads(weighted, local_images, local_texts, scale)
            out[f"tiled_uneven{tile}"] = (
                averaged(weighted).item() * world_size, image_grad, text_grad, averaged(scale_grad) * world_size,
            )
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world_size = request.param
    return world_size, run_on_ranks(_rank_scenarios, world_size, world_size)


def _global_siglip_reference(world_size: int) -> list[Any]:
    images, texts = _features(world_size * LOCAL_BATCH)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale, bias = _leaf(SCALE), _leaf(BIAS, (1,))
    loss = siglip_loss(images, texts, scale, bias)
    return [loss.item(), *_grads(loss, images, texts, scale, bias)]


def test_siglip_ring_equals_global_batch_loss(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world_size, results = ranks
    ref_loss, ref_image_grad, ref_text_grad, ref_scale_grad, ref_bias_grad = _global_siglip_reference(world_size)
    for rank, result in enumerate(results):
        loss, image_grad, text_grad, scale_grad, bias_grad = result["siglip"]
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        _assert_close(loss, ref_loss)
        _assert_close(image_grad, ref_image_grad[rows])
        _assert_close(text_grad, ref_text_grad[rows])
        _assert_close(scale_grad, ref_scale_grad)
        _assert_close(bias_grad, ref_bias_grad)
    # The comparisons are not between zeros, and every text row receives gradient from other ranks' images.
    assert ref_text_grad.abs().sum(dim=-1).min() > 0 and ref_scale_grad.abs() > 0 and ref_bias_grad.abs() > 0


def test_siglip_ring_in_subgroup_through_builder(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world_size, results = ranks
    ref_loss, ref_image_grad, ref_text_grad, _, _ = _global_siglip_reference(world_size)
    for rank, result in enumerate(results):
        loss, image_grad, text_grad = result["siglip_group"]
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        _assert_close(loss, ref_loss)
        _assert_close(image_grad / world_size, ref_image_grad[rows])
        _assert_close(text_grad / world_size, ref_text_grad[rows])


@pytest.mark.parametrize("ranks", [2], indirect=True, ids=["world2"])  # the uneven scenario runs on 2 ranks only
def test_siglip_ring_uneven_local_batches(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    images, texts = _features(sum(UNEVEN_BATCHES), seed=1)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale, bias = _leaf(SCALE), _leaf(BIAS)
    summed = siglip_loss(images, texts, scale, bias) * images.shape[0]
    ref_image_grad, ref_text_grad, ref_scale_grad, ref_bias_grad = _grads(summed, images, texts, scale, bias)
    for rank, result in enumerate(results):
        loss, image_grad, text_grad, scale_grad, bias_grad = result["siglip_uneven"]
        start = sum(UNEVEN_BATCHES[:rank])
        part = slice(start, start + UNEVEN_BATCHES[rank])
        _assert_close(loss, summed.item())
        _assert_close(image_grad, ref_image_grad[part])
        _assert_close(text_grad, ref_text_grad[part])
        _assert_close(scale_grad, ref_scale_grad)
        _assert_close(bias_grad, ref_bias_grad)


@pytest.mark.parametrize("ranks", [2], indirect=True, ids=["world2"])  # the uneven scenario runs on 2 ranks only
@pytest.mark.parametrize("tile", UNEVEN_TILES)
def test_tiled_infonce_uneven_local_batches(ranks: tuple[int, list[dict[str, Any]]], tile: int) -> None:
    _, results = ranks
    images, texts = _features(sum(UNEVEN_BATCHES), seed=1)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale = _leaf(SCALE)
    summed = clip_loss(images, texts, scale) * images.shape[0]
    ref_image_grad, ref_text_grad, ref_scale_grad = _grads(summed, images, texts, scale)
    for rank, result in enumerate(results):
        loss, image_grad, text_grad, scale_grad = result[f"tiled_uneven{tile}"]
        start = sum(UNEVEN_BATCHES[:rank])
        part = slice(start, start + UNEVEN_BATCHES[rank])
        _assert_close(loss, summed.item())
        _assert_close(image_grad, ref_image_grad[part])
        _assert_close(text_grad, ref_text_grad[part])
        _assert_close(scale_grad, ref_scale_grad)
    assert ref_text_grad.abs().sum(dim=-1).min() > 0 and ref_scale_grad.abs() > 0


def test_tiled_infonce_on_ranks_equals_global_batch_loss(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world_size, results = ranks
    images, texts = _features(world_size * LOCAL_BATCH)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale = _leaf(SCALE)
    ref = clip_loss(images, texts, scale)
    ref_image_grad, ref_text_grad, ref_scale_grad = _grads(ref, images, texts, scale)
    for rank, result in enumerate(results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for name in ("tiled", "clip"):
            loss, image_grad, text_grad, scale_grad = result[name]
            _assert_close(loss, ref.item())
            _assert_close(image_grad, ref_image_grad[rows])
            _assert_close(text_grad, ref_text_grad[rows])
            _assert_close(scale_grad, ref_scale_grad)
        shapes = result["tiled_saved_shapes"]
        assert shapes and (LOCAL_BATCH, world_size * LOCAL_BATCH) not in shapes
        # Nothing bigger than the gathered features (B x dim < b x B here) is kept for backward.
        assert max(torch.Size(shape).numel() for shape in shapes) <= world_size * LOCAL_BATCH * NARROW_DIM


# --------------------------------------------------------------------------------------------------- single process


def test_siglip_single_process_matches_paper_formula() -> None:
    images, texts = _features(6)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale, bias = _leaf(SCALE), _leaf(BIAS)
    loss = siglip_loss(images, texts, scale, bias)
    ref = _direct_siglip(images, texts, scale, bias)
    _assert_close(loss, ref)
    for got, want in zip(_grads(loss, images, texts, scale, bias), _grads(ref, images, texts, scale, bias)):
        _assert_close(got, want)
    # Without a bias the loss is the formula at bias zero.
    _assert_close(siglip_loss(images, texts, scale, None), _direct_siglip(images, texts, scale, torch.tensor(0.0)))


@pytest.mark.parametrize("tile_size", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scalar", "shape1"])
def test_tiled_infonce_matches_clip_loss(tile_size: int, scale_shape: tuple[int, ...]) -> None:
    images, texts = _features(10, seed=tile_size)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale = _leaf(SCALE, scale_shape)
    ref = clip_loss(images, texts, scale)
    tiled = tiled_clip_loss(images, texts, scale, tile_size=tile_size)
    _assert_close(tiled, ref)
    for got, want in zip(_grads(tiled, images, texts, scale), _grads(ref, images, texts, scale)):
        assert got.shape == want.shape
        _assert_close(got, want)


def test_tiled_infonce_applies_upstream_gradient() -> None:
    # The gradients are formed in forward; backward must still scale them by whatever multiplies the loss, and a
    # frozen side (no key gradient wanted) must not change the other side's gradient.
    images, texts = _features(7, seed=2)
    images.requires_grad_(True)
    scale = _leaf(SCALE)
    ref = -2.5 * clip_loss(images, texts, scale) + images.sum()
    tiled = -2.5 * tiled_clip_loss(images, texts, scale, tile_size=3) + images.sum()
    _assert_close(tiled, ref)
    for got, want in zip(_grads(tiled, images, scale), _grads(ref, images, scale)):
        _assert_close(got, want)


def test_tiled_infonce_bf16_inputs_and_autocast() -> None:
    images, texts = _features(9, seed=3)
    # bf16 features: computed in fp32 from the same values, returned in fp32, gradients in bf16.
    low = [x.bfloat16().requires_grad_(True) for x in (images, texts)]
    exact = [x.float().detach().requires_grad_(True) for x in low]
    scale = _leaf(SCALE)
    tiled = tiled_clip_loss(*low, scale, tile_size=4)
    ref = clip_loss(*exact, scale)
    assert tiled.dtype == torch.float32
    _assert_close(tiled, ref)
    for got, want in zip(_grads(tiled, *low), _grads(ref, *exact)):
        assert got.dtype == torch.bfloat16
        # A feature's gradient sums its query and key parts, each rounded to bf16 and added in bf16: three roundings
        # of at most half an ulp (2^-8 relative) of the largest entry.
        torch.testing.assert_close(got.float(), want, rtol=0, atol=3 * 2**-8 * want.abs().max().item())
    # fp32 features under bf16 autocast: autocast is off inside, so the result keeps fp32 accuracy (bf16 logits
    # would be off by ~1e-3 relative).
    fp32 = [x.clone().requires_grad_(True) for x in (images, texts)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled = tiled_clip_loss(*fp32, scale, tile_size=4)
    ref_inputs = [x.clone().requires_grad_(True) for x in (images, texts)]
    ref = clip_loss(*ref_inputs, scale)
    _assert_close(tiled, ref)
    for got, want in zip(_grads(tiled, *fp32, scale), _grads(ref, *ref_inputs, scale)):
        _assert_close(got, want)


def test_tiled_infonce_gradcheck_float64() -> None:
    images, texts = (x.double().requires_grad_(True) for x in _features(5))
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: tiled_clip_loss(i, t, s, tile_size=2), (images, texts, scale))


def test_tiled_infonce_saves_no_full_logits() -> None:
    batch, tile = 12, 5
    images, texts = (x[:, :NARROW_DIM].clone().requires_grad_(True) for x in _features(batch))
    scale = _leaf(SCALE)
    # The hook does see clip_loss's b x B logits/softmax, so its silence for the tiled loss means something.
    assert (batch, batch) in _saved_shapes(lambda: clip_loss(images, texts, scale))
    shapes = _saved_shapes(lambda: tiled_clip_loss(images, texts, scale, tile_size=tile))
    assert shapes and (batch, batch) not in shapes
    assert all(torch.Size(shape).numel() <= batch * NARROW_DIM for shape in shapes)  # features at most, no tile either


def test_tiled_infonce_rejects_bad_tile() -> None:
    images, texts = _features(4)
    with pytest.raises(ValueError, match="tile_size"):
        tiled_clip_loss(images, texts, torch.tensor(SCALE), tile_size=0)


def test_build_contrastive_loss() -> None:
    images, texts = _features(6)
    scale, bias = torch.tensor(SCALE), torch.tensor(BIAS)
    assert LOSS_NAMES == ("infonce", "infonce_tiled", "siglip")
    _assert_close(build_contrastive_loss("infonce")(images, texts, scale), clip_loss(images, texts, scale))
    _assert_close(build_contrastive_loss("infonce_tiled")(images, texts, scale), clip_loss(images, texts, scale))
    siglip = build_contrastive_loss("siglip")
    _assert_close(siglip(images, texts, scale, bias), _direct_siglip(images, texts, scale, bias))
    with pytest.raises(ValueError, match="infonce, infonce_tiled, siglip"):
        build_contrastive_loss("sigmoid")
    with pytest.raises(ValueError, match="logit_bias"):
        build_contrastive_loss("infonce")(images, texts, scale, bias)


# ------------------------------------------------------------------------------------------------------------ ProCLIP


def _smooth_l1(diff: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    small = diff.abs() < beta
    return torch.where(small, 0.5 * diff**2 / beta, diff.abs() - 0.5 * beta)


def _reference_structure(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    terms = [
        _smooth_l1((s[i] - s[j]).norm() - (t[i] - t[j]).norm())
        for i in range(len(s)) for j in range(i + 1, len(s))
    ]
    return torch.stack(terms).mean()


def _reference_instance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return torch.stack([((s[i] - t[i]) ** 2).sum() for i in range(len(s))]).mean()


def _random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def test_proclip_losses_vanish_on_identical_directions() -> None:
    student, _ = _features(6)
    teacher = 3.0 * student  # same directions, different norms: normalisation makes them identical
    for loss in (instance_loss, structure_loss, self_distillation_loss):
        assert loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_proclip_losses_match_reference_and_are_positive() -> None:
    gen = torch.Generator().manual_seed(3)
    # Raw (unnormalised) features with large distances so both smooth-L1 branches are exercised.
    student, teacher = torch.randn(7, DIM, generator=gen) * 2, torch.randn(7, DIM, generator=gen)
    teacher[0] = -teacher[1]
    ins, struct = instance_loss(student, teacher), structure_loss(student, teacher)
    assert ins > 0 and struct > 0
    _assert_close(ins, _reference_instance(student, teacher))
    _assert_close(struct, _reference_structure(student, teacher))
    _assert_close(self_distillation_loss(student, teacher), ins + struct)


def test_structure_loss_rotation_invariant() -> None:
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(8, DIM, generator=gen), torch.randn(8, DIM, generator=gen)
    rotation = _random_rotation(DIM, seed=5)
    _assert_close(structure_loss(student @ rotation, teacher @ rotation), structure_loss(student, teacher))
    # Rotating only one side changes nothing either (distances are within a batch) but does change the instance term.
    _assert_close(structure_loss(student @ rotation, teacher), structure_loss(student, teacher))
    assert not torch.isclose(instance_loss(student @ rotation, teacher), instance_loss(student, teacher))


def test_proclip_gradients_reach_student_only_and_stay_finite() -> None:
    student, teacher = _features(5)
    student = torch.cat([student, student[:1]]).requires_grad_(True)  # a duplicate row: pdist at distance zero
    teacher = torch.cat([teacher, teacher[:1]]).requires_grad_(True)
    self_distillation_loss(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None  # targets are detached
