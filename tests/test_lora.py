"""LoRA on the megatron tower: TP=2 trains exactly like TP=1 (and like TP=1 x DP=2), merging is exact, only adapters
train, and a target inside a fused linear touches only its own rows.

Spawning ranks costs seconds (megatron import), so one 2-rank run does everything: first as TP=2 x DP=1, then, after
tearing megatron's groups down, as TP=1 x DP=2. The tests assert on what both phases return.
"""

from __future__ import annotations

import pytest
import torch

from llm2clip_scale.config.schema import LLMConfig
from tests.multiprocess import run_on_ranks
from tests.pair_batches import INSTRUCTION_TOKENS, PAIRS, WIDTH, synthetic_pair_tokens

CFG = LLMConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    vocab_size=128, max_seq_len=32, seed=4321,
)
LORA_RANK, LORA_ALPHA, STEPS, LR = 4, 8.0, 3, 1e-3


def _pair_tokens() -> dict[str, torch.Tensor]:
    """Global batch of (query, positive, negative) token rows, flattened to (3 * PAIRS, WIDTH)."""
    ids, mask, pool = synthetic_pair_tokens(CFG.vocab_size, seed=7)
    return {"ids": ids.reshape(-1, WIDTH), "mask": mask.reshape(-1, WIDTH), "pool": pool.reshape(-1, WIDTH)}


def _train(dropout: float, split: bool, loss_group: object) -> dict:
    """3 AdamW steps of SimCSE on LoRA; ``split`` gives each DP rank half the pairs and averages gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.losses.simcse import simcse_loss
    from llm2clip_scale.models.llm.lora import apply_lora, gather_lora_state, lora_adapters, merge_lora
    from llm2clip_scale.models.llm.tower import build_text_tower

    tower = build_text_tower(CFG, trainable=True)
    tower.train()
    params = apply_lora(tower, LORA_RANK, LORA_ALPHA, dropout)
    trainable = sorted(name for name, p in tower.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    dp_group = parallel_state.get_data_parallel_group()
    dp_size, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    data = _pair_tokens()
    rows = torch.arange(PAIRS)
    if split:
        rows = rows.chunk(dp_size)[dp_rank]
    pick = torch.cat([rows, rows + PAIRS, rows + 2 * PAIRS])  # this rank's queries, positives, negatives
    torch.manual_seed(99)  # the dropout masks: the same stream on every rank and in both phases
    losses = []
    for _ in range(STEPS):
        emb = tower(data["ids"][pick], data["mask"][pick], data["pool"][pick])
        query, positive, negative = emb.chunk(3)
        loss = simcse_loss(query, positive, negative, group=loss_group)
        loss.backward()
        reported = loss.detach().clone()
        if split:  # data-parallel convention: average the local losses and gradients over LLM-DP
            for p in params:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp_size
            dist.all_reduce(reported, group=dp_group)
            reported /= dp_size
        losses.append(reported.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = gather_lora_state(tower)
    tower.eval()
    eval_ids, eval_mask = data["ids"][:PAIRS], data["mask"][:PAIRS]
    with torch.no_grad():
        lora_out = tower(eval_ids, eval_mask)
        merged_count = merge_lora(tower)
        merged_out = tower(eval_ids, eval_mask)
    return {
        "losses": losses, "state": state, "trainable": trainable, "num_params": len(params),
        "lora_out": lora_out, "merged_out": merged_out, "merged_count": merged_count,
        "adapters_left": len(lora_adapters(tower)),
        "all_trainable_again": all(p.requires_grad for p in tower.parameters()),
    }


def _fused_rows() -> dict:
    """linear_qkv / linear_fc1 outputs of layer 1 before and after a q+gate LoRA with random (non-zero) B."""
    from megatron.core import parallel_state

    from llm2clip_scale.models.llm.lora import apply_lora, gather_lora_state, load_lora_state
    from llm2clip_scale.models.llm.tower import build_text_tower

    tower = build_text_tower(CFG)  # frozen, eval mode
    layer = tower.decoder.layers[0]
    x = torch.randn(5, 3, CFG.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_qkv, base_fc1 = layer.self_attention.linear_qkv(x)[0], layer.mlp.linear_fc1(x)[0]
        apply_lora(tower, LORA_RANK, LORA_ALPHA, 0.0, targets=("q", "gate"))
        gen = torch.Generator().manual_seed(11)
        state = {k: (torch.randn(v.shape, generator=gen) if ".B." in k else v)
                 for k, v in sorted(gather_lora_state(tower).items())}
        load_lora_state(tower, state)
        lora_qkv, lora_fc1 = layer.self_attention.linear_qkv(x)[0], layer.mlp.linear_fc1(x)[0]
    return {"base_qkv": base_qkv, "lora_qkv": lora_qkv, "base_fc1": base_fc1, "lora_fc1": lora_fc1, "x": x,
            "state": state, "state_keys": sorted(state),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size()}


def _bf16_master_step() -> dict:
    """A bf16 frozen base with LoRA, one AdamW step at lr 1e-5 through the optimizer builder every stage uses."""
    from llm2clip_scale.kernels import build_optimizer
    from llm2clip_scale.models.llm.lora import apply_lora, lora_adapters
    from llm2clip_scale.models.llm.tower import build_text_tower

    tower = build_text_tower(CFG, params_dtype=torch.bfloat16, trainable=True)
    tower.train()
    params = apply_lora(tower, LORA_RANK, LORA_ALPHA, 0.0)
    gen = torch.Generator().manual_seed(5)
    for adapter in lora_adapters(tower).values():  # B = 0 at init would leave every A gradient zero
        for b in adapter.B.values():
            b.data.copy_(0.01 * torch.randn(b.shape, generator=gen))
    data = _pair_tokens()
    tower(data["ids"], data["mask"], data["pool"]).float().pow(2).mean().backward()
    a_params = [a for adapter in lora_adapters(tower).values() for a in adapter.A.values()]
    before = [a.detach().clone() for a in a_params]
    optimizer = build_optimizer(params, lr=1e-5, eps=1e-15)
    optimizer.step()
    has_grad = torch.cat([(a.grad.abs() > 1e-12).flatten() for a in a_params])
    steps = torch.cat([(a.detach() - b).abs().flatten() for a, b in zip(a_params, before, strict=True)])
    return {
        "base_dtype": tower.decoder.layers[0].self_attention.linear_qkv.weight.dtype,
        "param_dtypes": {p.dtype for p in params}, "grad_dtypes": {p.grad.dtype for p in params},
        "state_dtypes": {v.dtype for state in optimizer.state.values() for v in state.values() if v.dim() > 0},
        "a_magnitude": float(torch.cat([b.abs().flatten() for b in before]).median()),
        "steps_with_grad": steps[has_grad],
    }


def _cra_batches(rank: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """10 pairs: rank 0 holds 6 (batches of 4 and 2), rank 1 holds 4 (one batch); keys are edited queries."""
    gen = torch.Generator().manual_seed(5)
    n = 10
    query = torch.randint(0, CFG.vocab_size, (n, WIDTH), generator=gen)
    key = query.clone()
    key[:, 4:] = torch.randint(0, CFG.vocab_size, (n, WIDTH - 4), generator=gen)
    mask = (torch.arange(WIDTH)[None, :] < torch.randint(6, WIDTH + 1, (n, 1), generator=gen)).long()
    pool = mask.clone()
    pool[:, :INSTRUCTION_TOKENS] = 0
    spans = [[(0, 4), (4, 6)], [(6, 10)]][rank]
    batches = [{"query_input_ids": query[a:b], "query_attention_mask": mask[a:b], "query_pool_mask": pool[a:b],
                "positive_input_ids": key[a:b], "positive_attention_mask": mask[a:b]} for a, b in spans]
    return batches, {"query": query, "key": key, "mask": mask, "pool": pool}


def _cra(grouped: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.eval.cra import caption_retrieval_accuracy, evaluate_cra
    from llm2clip_scale.models.llm.tower import build_text_tower

    tower = build_text_tower(CFG)
    batches, full = _cra_batches(dist.get_rank())
    tp_group = parallel_state.get_tensor_model_parallel_group() if grouped else None
    result = evaluate_cra(tower, batches, tp_group=tp_group, gather_group=dist.group.WORLD)
    with torch.no_grad():
        reference = caption_retrieval_accuracy(
            tower(full["query"], full["mask"], full["pool"]), tower(full["key"], full["mask"])
        )
    return {**result, "reference": reference}


def _worker() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed

    init_distributed("gloo")
    own_group, _ = dist.new_subgroups(group_size=1)
    out: dict = {}
    build_topology(2, 1)  # TP=2 x DP=1: both ranks hold the whole batch
    dp = parallel_state.get_data_parallel_group()
    out["tp2_dropout"] = _train(0.05, split=False, loss_group=dp)
    out["tp2"] = _train(0.0, split=False, loss_group=dp)
    out["tp2_fused"] = _fused_rows()
    out["tp2_cra"] = _cra(grouped=True)
    parallel_state.destroy_model_parallel()
    build_topology(1, 1)  # TP=1 x DP=2
    out["tp1_dropout"] = _train(0.05, split=False, loss_group=own_group)
    out["tp1_dp2"] = _train(0.0, split=True, loss_group=parallel_state.get_data_parallel_group())
    out["tp1_fused"] = _fused_rows()
    out["tp1_cra"] = _cra(grouped=False)
    out["bf16_master"] = _bf16_master_step()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_worker, 2)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / expected.abs().max().item()


def test_tp2_training_matches_tp1(ranks: list[dict]) -> None:
    """Same seed, data and dropout masks: the loss trajectory and the trained adapters do not depend on TP (or on
    splitting the batch over LLM-DP with the gathered SimCSE loss)."""
    for reference, other in (("tp1_dropout", "tp2_dropout"), ("tp1_dp2", "tp2")):
        ref = ranks[0][reference]
        assert ref["losses"][-1] < ref["losses"][0] - 0.05, ref["losses"]  # training actually moved the adapters
        for rank in ranks:
            assert rank[other]["losses"] == pytest.approx(ref["losses"], rel=1e-5), (other, rank[other]["losses"])
            assert rank[reference]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
            assert rank[other]["state"].keys() == ref["state"].keys()
            for key, full in ref["state"].items():
                assert _rel_err(rank[other]["state"][key], full) <= 1e-4, key
    # Dropout is active: it changes the trajectory.
    assert ranks[0]["tp1_dropout"]["losses"][1:] != pytest.approx(ranks[0]["tp1_dp2"]["losses"][1:], rel=1e-4)


def test_only_lora_parameters_train(ranks: list[dict]) -> None:
    run = ranks[0]["tp2"]
    # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    assert run["num_params"] == len(run["trainable"]) == CFG.num_layers * 7 * 2
    assert all(".lora.A." in name or ".lora.B." in name for name in run["trainable"])


def test_merge_equals_lora_forward(ranks: list[dict]) -> None:
    for rank in ranks:
        for key in ("tp2_dropout", "tp1_dropout"):
            run = rank[key]
            assert run["merged_count"] == CFG.num_layers * 4 and run["adapters_left"] == 0
            assert run["all_trainable_again"]  # merge restores the flags apply_lora found (a trainable tower)
            assert _rel_err(run["merged_out"], run["lora_out"]) <= 1e-5


def _qkv_parts(out: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local linear_qkv output -> (q rows, k and v rows), by megatron's per-query-group interleaving."""
    head_dim = CFG.hidden_size // CFG.num_attention_heads
    q_rows = CFG.num_attention_heads // CFG.num_query_groups * head_dim
    grouped = out.reshape(*out.shape[:-1], groups, q_rows + 2 * head_dim)
    return grouped[..., :q_rows], grouped[..., q_rows:]


def test_q_and_gate_lora_touch_only_their_rows(ranks: list[dict]) -> None:
    for name, groups_per_rank in (("tp1_fused", CFG.num_query_groups), ("tp2_fused", CFG.num_query_groups // 2)):
        for rank in ranks:
            run = rank[name]
            base_q, base_kv = _qkv_parts(run["base_qkv"], groups_per_rank)
            lora_q, lora_kv = _qkv_parts(run["lora_qkv"], groups_per_rank)
            assert torch.equal(base_kv, lora_kv), name  # k and v rows bit-identical
            assert (lora_q - base_q).abs().amax(dim=(0, 1)).min() > 1e-3, name  # every q row changed
            gate_base, up_base = run["base_fc1"].chunk(2, dim=-1)
            gate_lora, up_lora = run["lora_fc1"].chunk(2, dim=-1)
            assert torch.equal(up_base, up_lora), name
            assert (gate_lora - gate_base).abs().amax(dim=(0, 1)).min() > 1e-3, name
            assert all(".q" in k or ".gate" in k for k in run["state_keys"])
    # TP=2 shards reassemble into the TP=1 outputs: qkv splits whole query groups; fc1 is [gate_r, up_r] per rank.
    tp1 = ranks[0]["tp1_fused"]
    qkv = torch.cat([rank["tp2_fused"]["lora_qkv"] for rank in ranks], dim=-1)
    assert _rel_err(qkv, tp1["lora_qkv"]) <= 1e-5
    halves = [rank["tp2_fused"]["lora_fc1"].chunk(2, dim=-1) for rank in ranks]
    fc1 = torch.cat([halves[0][0], halves[1][0], halves[0][1], halves[1][1]], dim=-1)
    assert _rel_err(fc1, tp1["lora_fc1"]) <= 1e-5


def test_lora_update_is_alpha_over_r_times_b_a(ranks: list[dict]) -> None:
    """The update a target adds is x (alpha/r · B A)^T, with alpha/r written out here: forward and merge share one
    scaling factor in the code, so comparing them with each other could not catch a wrong one."""
    run = ranks[0]["tp1_fused"]
    prefix = "decoder.layers.0"
    scaling = LORA_ALPHA / LORA_RANK

    def update(target: str, linear: str) -> torch.Tensor:
        a, b = run["state"][f"{prefix}.{linear}.lora.A.{target}"], run["state"][f"{prefix}.{linear}.lora.B.{target}"]
        return run["x"] @ (scaling * b @ a).T

    base_q, _ = _qkv_parts(run["base_qkv"], CFG.num_query_groups)
    lora_q, _ = _qkv_parts(run["lora_qkv"], CFG.num_query_groups)
    expected_q = update("q", "self_attention.linear_qkv").reshape(lora_q.shape)  # q_proj rows, group by group
    assert _rel_err(lora_q - base_q, expected_q) <= 1e-5
    gate_base, _ = run["base_fc1"].chunk(2, dim=-1)
    gate_lora, _ = run["lora_fc1"].chunk(2, dim=-1)
    assert _rel_err(gate_lora - gate_base, update("gate", "mlp.linear_fc1")) <= 1e-5


def test_cra_over_a_tower_with_uneven_ranks(ranks: list[dict]) -> None:
    reference = ranks[0]["tp1_cra"]["reference"]
    assert 0.2 < reference < 1.0  # edited keys: neither chance (0.1) nor trivially perfect
    for rank in ranks:
        for key in ("tp1_cra", "tp2_cra"):
            assert rank[key]["num_pairs"] == 10
            assert rank[key]["cra"] == pytest.approx(reference, abs=1e-12), key


def test_bf16_base_keeps_fp32_lora_master_weights(ranks: list[dict]) -> None:
    """Under a bf16 frozen base the adapters, their gradients and AdamW state are fp32, so a step of 1e-5 lands on A
    (median |A| ~0.06, where bf16's spacing is 2.4e-4: stored in bf16, A + 1e-5 would round back to A)."""
    got = ranks[0]["bf16_master"]
    assert got["base_dtype"] == torch.bfloat16
    assert got["param_dtypes"] == got["grad_dtypes"] == got["state_dtypes"] == {torch.float32}
    assert got["a_magnitude"] > 0.03  # well above 1e-5 / 2**-9: bf16 could not hold the step
    steps = got["steps_with_grad"]
    # Adam's first step moves each entry with a gradient by lr * |g| / (|g| + eps) = lr (eps 1e-15 << |g|), up to
    # fp32's rounding of A near 0.06 (~4e-9, i.e. 4e-4 of the step).
    assert steps.numel() > 1000 and torch.allclose(steps, torch.full_like(steps, 1e-5), rtol=0, atol=1e-8)
