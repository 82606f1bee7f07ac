"""LLM2CLIP stage 1: gradient caching is exact (PP=1 against the uncached full batch, with replayed dropout masks,
and PP=2 against PP=1), and a 2-rank run on synthetic captions lowers the loss, raises CRA above the untuned
tower's, and writes a LoRA checkpoint that reproduces the trained embeddings.

Spawning ranks costs seconds (megatron import), so each multi-process fixture does several things in one run.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from llm2clip_scale.config import load_config
from llm2clip_scale.config.schema import LLMConfig
from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset
from tests.multiprocess import run_on_ranks
from tests.pair_batches import PAIRS, WIDTH, synthetic_pair_tokens

REPO = Path(__file__).resolve().parents[1]
CFG = LLMConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    vocab_size=128, max_seq_len=32, seed=4321,
)
MICRO_ROWS = 4  # 3 x 8 rows -> 6 micro-batches (3 per DP rank at DP=2)
DROPOUT = 0.1
STEPS = 16  # of the 2-rank synthetic run


# ------------------------------------------------------------------------------------------------- grad caching


def _pair_texts() -> dict[str, torch.Tensor]:
    """The global batch: queries (with a 2-token unpooled 'instruction'), positives and hard negatives, (8, 10) each."""
    ids, mask, pool = synthetic_pair_tokens(CFG.vocab_size, seed=11)
    return {"ids": ids * mask, "mask": mask, "pool": pool}  # (3, PAIRS, WIDTH) each


def _random_lora(tower: torch.nn.Module) -> None:
    """Non-zero adapters (B starts at zero, which would leave every A gradient zero), drawn per global key."""
    from llm2clip_scale.checkpoint.lora import global_lora_state, load_global_lora_state

    state = {
        key: 0.3 * torch.randn(value.shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
        for key, value in global_lora_state(tower).items()
    }
    load_global_lora_state(tower, state)


def _grads(tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients by global LoRA key, merged over pipeline stages (TP=1 here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.checkpoint.lora import global_lora_key
    from llm2clip_scale.models.llm.lora import lora_adapters

    grads = {}
    for name, adapter in lora_adapters(tower).items():
        for which, table in (("A", adapter.A), ("B", adapter.B)):
            for target, param in table.items():
                grads[global_lora_key(tower, f"{name}.{which}.{target}")] = param.grad.detach().clone()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        parts: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, grads, group=parallel_state.get_pipeline_model_parallel_group())
        grads = {k: v for part in parts for k, v in part.items()}
    return grads


def _grad_cache_phase(tp: int, pp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology
    from llm2clip_scale.losses.simcse import simcse_loss
    from llm2clip_scale.models.llm.embed import TextBatch, split_micro_batches
    from llm2clip_scale.models.llm.lora import apply_lora, lora_adapters
    from llm2clip_scale.models.llm.tower import build_text_tower
    from llm2clip_scale.train.grad_cache import grad_cache_step
    from llm2clip_scale.train.llm2clip_cc import pairs_cra
    from llm2clip_scale.train.llm_lora import average_over_data_parallel

    topo = build_topology(tp, pp)
    tower = build_text_tower(CFG, trainable=True)
    tower.train()
    params = apply_lora(tower, rank=4, alpha=8.0, dropout=0.0)
    _random_lora(tower)
    dp_group = parallel_state.get_data_parallel_group()
    data = _pair_texts()
    rows = torch.arange(PAIRS).chunk(topo.llm_dp_size)[topo.llm_dp_rank]  # this DP rank's pairs
    b = len(rows)
    texts = TextBatch(*(data[k][:, rows].reshape(3 * b, WIDTH) for k in ("ids", "mask", "pool")))

    def loss_fn(embeddings: torch.Tensor) -> torch.Tensor:
        query, positive, negative = embeddings.split(b)
        return simcse_loss(query, positive, negative, 0.02, group=dp_group)

    def step(run) -> tuple[float, dict[str, torch.Tensor]]:
        for p in params:
            p.grad = None
        loss = torch.tensor([float(run())], dtype=torch.float64)
        dist.all_reduce(loss, group=dp_group)
        average_over_data_parallel(params)
        return float(loss) / topo.llm_dp_size, _grads(tower)

    out: dict = {"dp": topo.llm_dp_size}
    cache = {}
    out["cached"] = step(lambda: cache.setdefault("r", grad_cache_step(tower, texts, loss_fn, MICRO_ROWS)).loss)
    out["num_microbatches"] = cache["r"].num_microbatches
    if pp == 1:
        def full_batch() -> float:  # no caching: the whole local batch in one autograd graph
            loss = loss_fn(tower(texts.input_ids, texts.attention_mask, texts.pool_mask))
            loss.backward()
            return loss.item()

        out["full"] = step(full_batch)

    # Dropout on: pass 2 must replay pass 1's masks.
    for adapter in lora_adapters(tower).values():
        adapter.dropout = DROPOUT
    torch.manual_seed(5)
    cache.clear()
    out["dropout_cached"] = step(lambda: cache.setdefault("r", grad_cache_step(tower, texts, loss_fn, MICRO_ROWS)).loss)
    out["replay_error"] = cache["r"].replay_error
    if pp == 1:
        def in_graph(seed: int) -> float:  # the same micro-batches in one graph, masks drawn from the same seed
            torch.manual_seed(seed)
            chunks, _ = split_micro_batches(texts, MICRO_ROWS, uniform=False)
            embeddings = torch.cat([tower(c.input_ids, c.attention_mask, c.pool_mask) for c in chunks])
            loss = loss_fn(embeddings)
            loss.backward()
            return loss.item()

        out["dropout_in_graph"] = step(lambda: in_graph(5))
        out["dropout_other_masks"] = step(lambda: in_graph(6))

    batch = {f"{side}_{key}": value[i, rows] for i, side in enumerate(("query", "positive"))
             for key, value in (("input_ids", data["ids"]), ("attention_mask", data["mask"]),
                                ("pool_mask", data["pool"]))}
    out["cra"] = pairs_cra(tower, [batch], micro_batch_size=3, device=topo.device)["cra"]
    parallel_state.destroy_model_parallel()
    return out


def _grad_cache_worker() -> list[dict]:
    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    return [_grad_cache_phase(1, 1), _grad_cache_phase(1, 2)]


@pytest.fixture(scope="module")
def grad_cache_runs() -> list[list[dict]]:
    return run_on_ranks(_grad_cache_worker, 2)


def _assert_grads_close(actual: dict, expected: dict, tol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0
    for key in expected:
        err = float((actual[key] - expected[key]).abs().max())
        assert err <= tol * max(scale, 1.0), (key, err, scale)


def test_grad_cache_equals_full_batch_at_pp1(grad_cache_runs: list[list[dict]]) -> None:
    for rank_result in grad_cache_runs:
        pp1 = rank_result[0]
        assert pp1["dp"] == 2 and pp1["num_microbatches"] == 3
        (cached_loss, cached), (full_loss, full) = pp1["cached"], pp1["full"]
        assert cached_loss == pytest.approx(full_loss, rel=1e-6)
        assert max(float(g.abs().max()) for k, g in full.items() if ".A." in k) > 0  # A gradients are live too
        _assert_grads_close(cached, full)


def test_grad_cache_replays_dropout_masks(grad_cache_runs: list[list[dict]]) -> None:
    pp1 = grad_cache_runs[0][0]
    assert pp1["replay_error"] == 0.0
    (cached_loss, cached), (graph_loss, in_graph) = pp1["dropout_cached"], pp1["dropout_in_graph"]
    assert cached_loss == pytest.approx(graph_loss, rel=1e-6)
    _assert_grads_close(cached, in_graph)
    # Other masks give clearly other gradients: the agreement above is the replay, not dropout being inert.
    other = pp1["dropout_other_masks"][1]
    assert max(float((other[k] - in_graph[k]).abs().max()) for k in in_graph) > 1e-3


def test_grad_cache_pp2_equals_pp1(grad_cache_runs: list[list[dict]]) -> None:
    pp1, pp2 = grad_cache_runs[0][0], grad_cache_runs[0][1]
    assert pp2["dp"] == 1 and pp2["num_microbatches"] == 6
    # PP=2 x DP=1 holds the whole global batch that PP=1 x DP=2 split over two ranks.
    assert pp2["cached"][0] == pytest.approx(pp1["cached"][0], rel=1e-6)
    _assert_grads_close(pp2["cached"][1], pp1["cached"][1])
    for rank_result in grad_cache_runs:  # both stages learn the same loss and replay exactly
        assert rank_result[1]["cached"][0] == pytest.approx(pp2["cached"][0], rel=1e-12)
        assert rank_result[1]["replay_error"] == 0.0
    # CRA through the pipeline (pooling masks that leave the instruction out) equals PP=1's evaluate_cra.
    assert pp2["cra"] == pytest.approx(pp1["cra"])


# ------------------------------------------------------------------------------------------------------- MNTP


def test_mntp_masking_follows_bert_80_10_10() -> None:
    from llm2clip_scale.models.llm.mntp import mask_tokens

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 50), generator=gen)
    ids[:, 0], ids[:, 40] = 1, 2  # BOS, EOS
    mask = torch.ones_like(ids)
    mask[:, 41:] = 0
    ids = ids * mask
    corrupted, labels = mask_tokens(ids, mask, [0, 1, 2], mask_id=3, vocab_size=100, probability=0.2, generator=gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()  # never position 0, specials or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen.float().sum() / (64 * 39) == pytest.approx(0.2, abs=0.02)
    masked = (corrupted == 3) & chosen
    kept = (corrupted == ids) & chosen
    assert masked.sum() / chosen.sum() == pytest.approx(0.8, abs=0.04)
    assert kept.sum() / chosen.sum() == pytest.approx(0.1 + 0.1 * 10 / 100, abs=0.04)  # random may redraw itself
    assert torch.equal(corrupted[~chosen], ids[~chosen])


# --------------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    build_synthetic_dataset(out, SyntheticParams(train_samples=512, eval_samples=64, image_size=16,
                                                 samples_per_shard=256, seed=0))  # 2 train shards
    return out


def _run_overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train_shards={data}/train-{{000000..000001}}.tar",
        f"stage1.eval_pairs={data}/eval-000000.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.global_batch=16",
        "train.micro_batch=4",  # 8 pairs per DP rank -> 2 cached micro-batches of 12 rows
        "data.max_text_len=64",
        "optim.lr=2.0e-3",
        "eval.interval=0",
        "eval.max_samples=64",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.interval=1",
        "logging.progress_bar=false",
    ]


def _stage1_worker(overrides: list[str]) -> dict:
    from llm2clip_scale.models.llm.embed import TextBatch
    from llm2clip_scale.train.llm2clip_cc import (
        LLM2CLIPCaptionContrastiveTask,
        build_lora_tower,
        evaluate_checkpoint_cra,
    )
    from llm2clip_scale.train.loop import run

    cfg = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides)
    trainer = LLM2CLIPCaptionContrastiveTask()
    result = run(cfg, trainer)
    batch = trainer._eval_batches[0]
    texts = TextBatch(batch["query_input_ids"][:8], batch["query_attention_mask"][:8], batch["query_pool_mask"][:8])
    trainer.tower.eval()
    with torch.no_grad():
        trained = trainer.tower(texts.input_ids, texts.attention_mask, texts.pool_mask)
        reloaded_tower, _ = build_lora_tower(cfg, torch.float32, trainer.topo.device, lora=cfg.checkpoint.dir,
                                             trainable=False)
        reloaded = reloaded_tower(texts.input_ids, texts.attention_mask, texts.pool_mask)
        untuned_tower, _ = build_lora_tower(cfg, torch.float32, trainer.topo.device, trainable=False)
        untuned = untuned_tower(texts.input_ids, texts.attention_mask, texts.pool_mask)
    result["reload_error"] = float((reloaded - trained).abs().max())
    result["untuned_error"] = float((untuned - trained).abs().max())
    result["cli_cra"] = evaluate_checkpoint_cra(cfg, cfg.checkpoint.dir)["cra"]
    return result


def _losses(log_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "llm2clip_cc"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def test_two_rank_stage1_learns_and_checkpoint_reloads(dataset: Path, tmp_path: Path) -> None:
    results = run_on_ranks(_stage1_worker, 2, _run_overrides(dataset, tmp_path))
    result = results[0]
    losses = _losses(tmp_path / "logs")
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert result["num_eval_pairs"] == 64
    # Caption retrieval improves over the untuned (random) tower's.
    assert result["cra"] > result["cra_before"] + 0.05, result
    assert results[1]["cra"] == result["cra"]  # every rank reports the same metrics
    assert result["max_replay_error"] < 1e-6
    # The checkpoint reproduces the trained embeddings, which differ from the untuned tower's.
    assert result["reload_error"] < 1e-6 and result["untuned_error"] > 1e-3, result
    assert result["cli_cra"] == pytest.approx(result["cra"])
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == f"step{STEPS}"
    assert (tmp_path / "ckpt" / f"step{STEPS}" / "adapter_config.json").is_file()


def _mntp_worker(overrides: list[str]) -> dict:
    from llm2clip_scale.train.llm2clip_cc import train_llm2clip_cc

    return train_llm2clip_cc(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides))


def test_two_rank_mntp_pre_step_lowers_its_loss(dataset: Path, tmp_path: Path) -> None:
    overrides = [*_run_overrides(dataset, tmp_path), "train.steps=1", "train.warmup_steps=0", "stage1.eval_pairs=null",
                 "stage1.mntp_steps=3", "stage1.mntp_lr=2.0e-3"]
    results = run_on_ranks(_mntp_worker, 2, overrides)
    mntp = results[0]["mntp"]
    # A random tower over a 42-token vocabulary starts near ln(vocab); three LoRA steps lower the masked-token loss.
    assert mntp["steps"] == 3 and 0 < mntp["final_loss"] < mntp["first_loss"] < 10, mntp
    assert results[1]["mntp"] == mntp


def test_stage1_config_rules(tmp_path: Path) -> None:
    from llm2clip_scale.config import ConfigError, validate

    # Stand-ins for the demo data, so that on a fresh clone (no data/synthetic) the layout rules alone are reported.
    for name in ("train-000000.tar", "train-000001.tar", "eval-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "tokenizer").mkdir()
    data = [f"data.train_shards={tmp_path}/train-{{000000..000001}}.tar", f"model.llm.tokenizer={tmp_path}/tokenizer",
            f"stage1.eval_pairs={tmp_path}/eval-000000.tar"]

    def problems(*overrides: str, world: int = 4) -> list[str]:
        with pytest.raises(ConfigError) as err:
            validate(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", [*data, *overrides]), world)
        return str(err.value).split("\n  - ")[1:]

    found = problems("model.llm.lora_rank=0", "stage1.temperature=0", "stage1.fields=[short,short]",
                     "stage1.mntp_probability=1.5", f"stage1.eval_pairs={tmp_path}/nonexistent.tar")
    # Every problem at once, one each, and nothing else.
    assert sorted(line.split(":")[0] for line in found) == [
        "model.llm.lora_rank", "stage1.eval_pairs", "stage1.fields", "stage1.mntp_probability", "stage1.temperature"
    ], found
    # The batch splits over LLM data parallelism only: 4 ranks at TP=2 are 2 replicas, so 16 = 8 x 2 is fine ...
    validate(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml",
                         [*data, "parallel.tensor_parallel=2", "train.global_batch=16", "train.micro_batch=8"]), 4)
    # ... but not at TP=1 (4 replicas).
    assert problems("train.global_batch=16", "train.micro_batch=8") == [
        "train.global_batch: 16 pairs is not a multiple of micro_batch (8) x LLM data-parallel size (4); stage 1 "
        "embeds micro_batch pairs at a time per model replica"
    ]
