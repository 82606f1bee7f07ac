"""Stage 2 with a trainable LLM LoRA (``model.llm.lora_rank > 0``, online): the gradient-cached tower pass
(``embed.backprop_local_batch``) gives the gradient single-process autograd gives over every rank's captions, at TP=2
and at PP=2; and whole stage-2 runs train the same function at TP=2, TP=1 x DP=2 and PP=2.

fp32; tolerances: gradients 1e-5 relative (the same sums in another order), trajectories 1e-5 relative per loss and
1e-4 on the trained LoRA matrices (AdamW divides by sqrt of second moments, which amplifies rounding in tiny
entries; measured ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2clip_scale.config.schema import LLMConfig
from tests.conftest import REPO, loss_records, tiny_overrides
from tests.multiprocess import run_on_ranks

CFG = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                vocab_size=128, max_seq_len=32, seed=4321)
ROWS = {0: (3, 9), 1: (5, 7)}  # (captions, longest length) of each rank: uneven, as in the colocated layout


def _rank_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, pool, upstream gradient) of one rank's captions; the pool leaves out each row's first token."""
    count, width = ROWS[rank]
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, CFG.vocab_size, (count, width), generator=gen)
    lengths = torch.randint(3, width + 1, (count,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    pool = mask.clone()
    pool[:, 0] = 0
    return ids, mask, pool, torch.randn(count, CFG.hidden_size, generator=gen)


def _tower_with_random_lora():
    from llm2clip_scale.checkpoint.lora import global_lora_state, load_global_lora_state
    from llm2clip_scale.models.llm.lora import apply_lora
    from llm2clip_scale.models.llm.tower import build_text_tower

    tower = build_text_tower(CFG)  # frozen, eval mode
    apply_lora(tower, 4, 8.0, 0.0)
    gen = torch.Generator().manual_seed(5)  # non-zero B, so A gets gradient too; the same full matrices everywhere
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 if ".B." in k else v
             for k, v in sorted(global_lora_state(tower).items())}
    load_global_lora_state(tower, state)
    return tower


def _full_grads(tower) -> dict[str, torch.Tensor]:
    """The LoRA gradients as whole (TP=1, PP=1) matrices, gathered like the LoRA state itself."""
    from llm2clip_scale.checkpoint.lora import global_lora_state
    from llm2clip_scale.models.llm.lora import lora_adapters

    params = [p for adapter in lora_adapters(tower).values() for p in adapter.parameters()]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(p.grad)
        grads = global_lora_state(tower)
        for p, value in zip(params, saved):
            p.copy_(value)
    return grads


def _gradient_worker() -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.embed import backprop_local_batch, embed_local_batch

    init_distributed("gloo")
    rank = dist.get_rank()
    ids, mask, pool, grad = _rank_rows(rank)
    out: dict = {}
    for tp, pp in ((2, 1), (1, 2)):
        build_topology(tp, pp)
        tower = _tower_with_random_lora()
        group = parallel_state.get_tensor_model_parallel_group()
        embeddings = embed_local_batch(tower, ids, mask, group, pool_mask=pool)
        backprop_local_batch(tower, ids, mask, pool, grad, group)
        out[f"tp{tp}pp{pp}"] = {"embeddings": embeddings, "grads": _full_grads(tower)}
        parallel_state.destroy_model_parallel()

    # Reference: one tower, autograd through all ranks' captions at once, loss = sum of embedding . upstream grad.
    build_topology(1, 1)
    tower = _tower_with_random_lora()
    rows = [_rank_rows(r) for r in sorted(ROWS)]
    width = max(r[0].shape[1] for r in rows)
    all_ids, all_mask, all_pool = (torch.cat([F.pad(r[i], (0, width - r[i].shape[1])) for r in rows]) for i in range(3))
    embeddings = tower(all_ids, all_mask, all_pool)
    (embeddings * torch.cat([r[3] for r in rows])).sum().backward()
    offset = sum(ROWS[r][0] for r in range(rank))
    out["reference"] = {"embeddings": embeddings.detach()[offset : offset + ROWS[rank][0]],
                        "grads": _full_grads(tower)}
    return out


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"], "tp1": [], "pp2": ["parallel.pipeline_parallel=2"]}


def _train_each(runs: list[list[str]]) -> None:
    from llm2clip_scale.config import load_config
    from llm2clip_scale.train.stage2 import train_stage2

    for overrides in runs:
        train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))


def _worker(runs: list[list[str]]) -> dict:
    # One pair of rank processes for everything: start-up (torch, DeepSpeed, megatron imports) dominates.
    gradients = _gradient_worker()
    _train_each(runs)
    return gradients


@pytest.fixture(scope="module")
def spawned(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stage2_lora")
    lora = ["model.llm.lora_rank=4", "model.llm.lora_alpha=8", "optim.llm_lora_lr=5.0e-3", "logging.interval=1",
            "train.micro_batch=4"]  # 2 accumulation micro-steps: the LoRA steps at the boundary, with the engine
    runs = {name: tiny_overrides(tiny_data, root / name, 2, *lora, *extra, "data.eval_shards=null")
            for name, extra in LAYOUTS.items()}
    gradients = run_on_ranks(_worker, 2, list(runs.values()), timeout=600)
    return {"gradients": gradients, "root": root}


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_gradient_cached_tower_pass_equals_autograd_over_all_ranks(spawned: dict, layout: str) -> None:
    for rank in spawned["gradients"]:
        reference, run = rank["reference"], rank[layout]
        assert _rel(run["embeddings"], reference["embeddings"]) <= 1e-5
        assert run["grads"].keys() == reference["grads"].keys() and len(reference["grads"]) == 2 * 2 * 7
        for key, expected in reference["grads"].items():
            assert expected.norm() > 0, key
            assert _rel(run["grads"][key], expected) <= 1e-5, key


# ------------------------------------------------------------------------------------------------ whole runs


def test_trainable_lora_trains_the_same_at_tp2_tp1_and_pp2(spawned: dict) -> None:
    root, runs = spawned["root"], LAYOUTS
    losses = {name: [loss for _, loss in loss_records(root / name)] for name in runs}
    # The LoRA gradient norm before clipping is scale-sensitive (AdamW's update is not): the TP=2 and PP=2 runs
    # average over the same world as the TP=1 x DP=2 run.
    norms = {name: [json.loads(line)["llm_lora_grad_norm"]
                    for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
             for name in runs}
    states = {name: load_file(str(root / name / "ckpt" / "step2" / "lora.safetensors")) for name in runs}
    assert len(losses["tp1"]) == 2
    for name in ("tp2", "pp2"):
        assert losses[name] == pytest.approx(losses["tp1"], rel=1e-5), name
        assert norms[name] == pytest.approx(norms["tp1"], rel=1e-5), name
        assert states[name].keys() == states["tp1"].keys()
        for key, expected in states["tp1"].items():
            assert _rel(states[name][key], expected) <= 1e-4, (name, key)
    # The LoRA trained: every B moved away from its zero start.
    assert all(value.abs().max() > 1e-4 for key, value in states["tp1"].items() if ".B." in key)
