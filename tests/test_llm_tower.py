"""The megatron-core LLM text tower on CPU/gloo: TP invariance, masking, and group embedding of per-rank captions.

Spawning a rank costs seconds (megatron import), so one TP=1 and one TP=2 run compute everything (module fixtures)
and the tests assert on their results.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm2clip_scale.config.schema import LLMConfig
from tests.multiprocess import run_on_ranks

CFG = LLMConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
    vocab_size=128, max_seq_len=32, seed=1234,
)


def _captions(seed: int, lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random captions; pad positions hold random ids too, so a leak through the mask would show."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


MAIN_IDS, MAIN_MASK = _captions(0, [9, 4, 12, 1], 12)
# Per-rank captions for the group-embedding test: different counts and padded widths on each rank.
RANK_CAPTIONS = [_captions(1, [5, 3, 2], 5), _captions(2, [9, 7], 11)]


def _full_weights(tower: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool, int, int]]:
    """name -> (local shard, is TP-parallel, partition dim, partition stride)."""
    return {
        name: (p.detach().clone(), bool(getattr(p, "tensor_model_parallel", False)),
               int(getattr(p, "partition_dim", -1)), int(getattr(p, "partition_stride", 1)))
        for name, p in tower.named_parameters()
    }


def _tp1_worker() -> dict:
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.embed import embed_local_batch
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    topo = build_topology(1, 1)
    tower = build_text_tower(CFG)
    causal = build_text_tower(dataclasses.replace(CFG, bidirectional=False))
    extra = 7  # appended pad columns, filled with (masked) random tokens
    junk = torch.randint(0, CFG.vocab_size, (MAIN_IDS.shape[0], extra))
    padded_ids = torch.cat([MAIN_IDS, junk], dim=1)
    padded_mask = torch.cat([MAIN_MASK, torch.zeros_like(junk)], dim=1)
    # The same captions left-padded: each row's tokens moved behind its padding.
    shift = [int(n) for n in (~MAIN_MASK.bool()).sum(1)]
    left_ids = torch.stack([row.roll(k) for row, k in zip(MAIN_IDS, shift)])
    left_mask = torch.stack([row.roll(k) for row, k in zip(MAIN_MASK, shift)])
    from megatron.core import parallel_state

    with torch.no_grad():
        return {
            "tp_size": topo.tp_size,
            "weights": _full_weights(tower),
            "bidir": tower(MAIN_IDS, MAIN_MASK),
            "bidir_padded": tower(padded_ids, padded_mask),
            "causal": causal(MAIN_IDS, MAIN_MASK),
            "causal_padded": causal(padded_ids, padded_mask),
            "bidir_left": tower(left_ids, left_mask),
            "causal_left": causal(left_ids, left_mask),
            "left_padding_used": bool((left_mask[:, 0] == 0).any()),
            "per_rank": [tower(ids, mask) for ids, mask in RANK_CAPTIONS],
            "group_tp1": embed_local_batch(tower, *RANK_CAPTIONS[0], parallel_state.get_tensor_model_parallel_group()),
            "frozen": not any(p.requires_grad for p in tower.parameters()) and not tower.training,
        }


def _tp2_worker() -> dict:
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.embed import embed_local_batch
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    topo = build_topology(2, 1)
    tower = build_text_tower(CFG)
    ids, mask = RANK_CAPTIONS[topo.rank]
    with torch.no_grad():
        return {
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "weights": _full_weights(tower),
            "bidir": tower(MAIN_IDS, MAIN_MASK),
            "group": embed_local_batch(tower, ids, mask, parallel_state.get_tensor_model_parallel_group()),
        }


@pytest.fixture(scope="module")
def tp1() -> dict:
    return run_on_ranks(_tp1_worker, 1)[0]


@pytest.fixture(scope="module")
def tp2() -> list[dict]:
    return run_on_ranks(_tp2_worker, 2)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max abs error {err} vs scale {expected.abs().max().item()}"


def _unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Invert megatron's master-weight split: each rank holds chunks r, r+world, ... of ``stride * world`` chunks."""
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][s] for s in range(stride) for rank in range(len(shards))], dim=dim)


def test_tp2_weights_are_slices_of_tp1_weights(tp1: dict, tp2: list[dict]) -> None:
    assert tp1["tp_size"] == 1 and all(r["tp_size"] == 2 for r in tp2)
    ref = tp1["weights"]
    assert set(ref) == set(tp2[0]["weights"])
    for name, (full, *_) in ref.items():
        shard0, parallel, dim, stride = tp2[0]["weights"][name]
        shard1 = tp2[1]["weights"][name][0]
        rebuilt = _unshard([shard0, shard1], dim, stride) if parallel else shard0
        if not parallel:
            assert torch.equal(shard0, shard1), name
        assert torch.equal(rebuilt, full), name


def test_tp2_matches_tp1(tp1: dict, tp2: list[dict]) -> None:
    for rank in tp2:
        _assert_rel_close(rank["bidir"], tp1["bidir"], 1e-5)
    assert tp1["bidir"].shape == (MAIN_IDS.shape[0], CFG.hidden_size) and tp1["bidir"].dtype == torch.float32
    assert tp1["frozen"]


def test_bidirectional_differs_from_causal_and_padding_is_invisible(tp1: dict) -> None:
    # A one-token caption sees only itself either way; every longer caption must change.
    longer = MAIN_MASK.sum(1) > 1
    diff = (tp1["bidir"] - tp1["causal"]).abs().amax(dim=1)
    assert (diff[longer] > 1e-3).all(), diff
    assert diff[~longer].max() <= 1e-6
    for key in ("bidir", "causal"):
        assert (tp1[f"{key}_padded"] - tp1[key]).abs().max().item() <= 1e-6, key
        # RoPE attention depends on relative positions only, so left padding embeds like right padding.
        assert (tp1[f"{key}_left"] - tp1[key]).abs().max().item() <= 1e-6, key
    assert tp1["left_padding_used"]


def test_group_embedding_returns_each_ranks_own_captions(tp1: dict, tp2: list[dict]) -> None:
    for rank, result in enumerate(tp2):
        _assert_rel_close(result["group"], tp1["per_rank"][rank], 1e-5)
    # TP=1 degenerates to a plain tower call.
    assert torch.equal(tp1["group_tp1"], tp1["per_rank"][0])


def test_cpu_compat_is_inert_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    from llm2clip_scale.distributed import cpu_compat

    watched = {
        (torch.cuda, "current_device"), (torch.cuda, "synchronize"), (torch.cuda, "empty_cache"),
        (mrandom, "CudaRNGStatesTracker"), (mrandom, "_get_cuda_rng_state"), (mrandom, "_set_cuda_rng_state"),
        (mrandom, "_CUDA_RNG_STATE_TRACKER"),
    }
    before = {(mod.__name__, name): getattr(mod, name) for mod, name in watched}
    was_enabled = cpu_compat.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_compat.enable_cpu_compat()
    assert {(mod.__name__, name): getattr(mod, name) for mod, name in watched} == before
    assert cpu_compat.is_enabled() == was_enabled


def test_layer_spec_choice_follows_the_kernel_registry_except_under_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a node with Transformer Engine, ``auto`` picks TE's layers for a plain tower and the local spec for one that
    carries LoRA (trained or merged from stage 1): TE's fused norm+linear would hide the adapters' input."""
    from megatron.core.transformer.enums import AttnMaskType

    from llm2clip_scale.models.llm import tower

    monkeypatch.setattr(tower, "megatron_layer_spec_name", lambda: "transformer_engine")
    assert tower.layer_spec_name(CFG) == "transformer_engine"
    assert tower.layer_spec_name(dataclasses.replace(CFG, lora_rank=4)) == "local"
    assert tower.layer_spec_name(dataclasses.replace(CFG, lora_init="ckpt/stage1")) == "local"
    assert tower.layer_spec_name(dataclasses.replace(CFG, layer_spec="local")) == "local"
    monkeypatch.setattr(tower, "megatron_layer_spec_name", lambda: "local")
    assert tower.layer_spec_name(CFG) == "local"
    spec = tower._layer_spec("local", bidirectional=False)
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.padding
    with pytest.raises(ValueError, match="model.llm.layer_spec: 'fused' unknown"):
        tower._layer_spec("fused", bidirectional=True)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_transformer_engine_gets_key_padding_masks_that_mean_the_local_pattern(bidirectional: bool) -> None:
    """TE's padding / padding_causal mask types read (b, 1, 1, L) key masks and add the triangle themselves; that
    mask, with TE's triangle, must be exactly the (b, 1, L, L) pattern the local spec is given."""
    from llm2clip_scale.models.llm.tower import attention_mask_for

    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    local = attention_mask_for("local", attention_mask, bidirectional)
    te = attention_mask_for("transformer_engine", attention_mask, bidirectional)
    assert local.shape == (3, 1, 5, 5) and te.shape == (3, 1, 1, 5)
    te_triangle = torch.zeros(5, 5, dtype=torch.bool) if bidirectional else torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.equal(te | te_triangle, local)
    assert torch.equal(te[:, 0, 0], attention_mask == 0)  # True = may not attend: exactly the padded keys
