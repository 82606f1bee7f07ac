"""Stage 2 in both modes against single-process references.

Online, TP=2 on 4 ranks: each TP group embeds its ranks' captions once and hands each rank its own rows back, so the
world-gathered features hold every sample exactly once and the loss equals the single-process loss over the
concatenated batch. Offline: training from float32 sidecar embeddings reproduces the online run step for step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm2clip_scale.config import load_config
from tests.multiprocess import run_on_ranks
from tests.test_train_stage2 import _losses, _overrides, _train_each

REPO = Path(__file__).resolve().parents[1]
LOCAL_BATCH = 4


@pytest.fixture(scope="module")
def dataset(tiny_data: Path) -> Path:
    return tiny_data  # the session's shared set (conftest.py)


def _config(data: Path, tp: int):
    overrides = [*_overrides(data, data.parent / "unused", steps=1), f"parallel.tensor_parallel={tp}"]
    return load_config(REPO / "configs" / "tiny_cpu.yaml", overrides)


def _features_for_batches(cfg, batches: list[dict], tower, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state

    from llm2clip_scale.models.llm.embed import embed_local_batch

    batch = {key: torch.cat([b[key] for b in batches]) for key in ("images",)}
    # Pad token ids to one width so captions from several ranks' batches can be embedded together.
    width = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1])) for b in batches])
    mask = torch.cat([torch.nn.functional.pad(b["attention_mask"], (0, width - b["attention_mask"].shape[1]))
                      for b in batches])
    embeddings = embed_local_batch(tower, ids, mask, parallel_state.get_tensor_model_parallel_group())
    image, text, scale, _ = model(batch["images"], embeddings)
    return image, text, scale


def _build(cfg):
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.clip import build_clip_model
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    topo = build_topology(cfg.parallel.tensor_parallel, 1)
    torch.manual_seed(cfg.train.seed)
    return topo, build_text_tower(cfg.model.llm), build_clip_model(cfg.model)


def _rank_batch(cfg, rank: int, world_size: int) -> dict:
    from llm2clip_scale.data.loader import build_train_loader

    loader = build_train_loader(cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, LOCAL_BATCH, rank,
                                world_size, cfg.train.seed, cfg.data.max_text_len)
    return next(iter(loader))


def _distributed_step(data: Path) -> dict:
    import torch.distributed as dist

    from llm2clip_scale.distributed.collectives import all_gather_rows
    from llm2clip_scale.losses import clip_loss

    cfg = _config(data, tp=2)
    topo, tower, model = _build(cfg)
    batch = _rank_batch(cfg, topo.rank, topo.world_size)
    image, text, scale = _features_for_batches(cfg, [batch], tower, model)
    loss = clip_loss(image, text, scale)
    loss.backward()
    keys = [None] * topo.world_size
    dist.all_gather_object(keys, batch["keys"])
    gathered_images, _ = all_gather_rows(image.detach())
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {"keys": keys, "images": gathered_images, "loss": mean_loss.item() / topo.world_size,
            "scale_grad": model.logit_scale.grad.clone()}


def _single_process_reference(data: Path, world_size: int) -> dict:
    from llm2clip_scale.losses import clip_loss

    cfg = _config(data, tp=1)
    _, tower, model = _build(cfg)
    batches = [_rank_batch(cfg, rank, world_size) for rank in range(world_size)]
    image, text, scale = _features_for_batches(cfg, batches, tower, model)
    loss = clip_loss(image, text, scale)
    loss.backward()
    return {"keys": [b["keys"] for b in batches], "images": image.detach(), "loss": loss.item(),
            "scale_grad": model.logit_scale.grad.clone()}


def test_tp2_online_features_hold_each_sample_once_and_loss_matches(dataset: Path) -> None:
    world = 4
    results = run_on_ranks(_distributed_step, world, dataset)
    reference = run_on_ranks(_single_process_reference, 1, dataset, world)[0]
    keys = [key for rank_keys in results[0]["keys"] for key in rank_keys]
    assert len(keys) == world * LOCAL_BATCH and len(set(keys)) == len(keys)  # every sample once, none twice
    assert results[0]["keys"] == reference["keys"]
    for result in results:
        torch.testing.assert_close(result["images"], reference["images"], rtol=1e-5, atol=1e-6)
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        # The logit-scale gradient of the global loss is the mean of the ranks' local gradients (DP averaging).
    scale_grad = sum(r["scale_grad"] for r in results) / world
    torch.testing.assert_close(scale_grad, reference["scale_grad"], rtol=1e-5, atol=1e-7)


def test_offline_sidecars_reproduce_the_online_run(dataset: Path, tiny_sidecars: Path, tmp_path: Path) -> None:
    sidecars = tiny_sidecars  # data_prep/embed_captions.py over the same set, float32 (conftest.py)
    steps = 4
    online = _overrides(dataset, tmp_path / "online", steps)
    offline = [*_overrides(dataset, tmp_path / "offline", steps),
               f"data.train_embedding_shards={sidecars}/train-{{000000..000003}}.tar",
               f"data.eval_embedding_shards={sidecars}/eval-000000.tar",
               "model.llm.tokenizer=''"]
    online_result, offline_result = run_on_ranks(_train_each, 2, [online, offline])[0]
    assert _losses(tmp_path / "offline" / "logs") == pytest.approx(_losses(tmp_path / "online" / "logs"), rel=1e-5)
    assert offline_result["r1_i2t"] == pytest.approx(online_result["r1_i2t"])
