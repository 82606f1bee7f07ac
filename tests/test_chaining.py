"""LLM2CLIP stage 1 -> stage 2: a stage-1 LoRA merged into the frozen tower (``model.llm.lora_init``) computes what
the stage-1 model computes — online (``build_text_tower``, as stage 2 and ProCLIP build it) at TP=2 and at PP=2, and
offline (``data_prep/embed_captions.py`` sidecars at TP=2). fp32 throughout; tolerance 1e-5 relative (merging
re-associates one matmul per linear, ~1e-7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_script, stage1_overrides, tiny_overrides
from tests.multiprocess import run_on_ranks

TOL = 1e-5
CAPTIONS = ["a small red circle", "a large blue square on a white background", "two shapes", "a green triangle"]


def _chaining_worker(data: Path, stage1: Path, out: Path) -> dict:
    from megatron.core import parallel_state

    from llm2clip_scale.config import load_config
    from llm2clip_scale.data.loader import build_eval_loader, load_tokenizer
    from llm2clip_scale.data.prompts import tokenize_captions
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.embed import TextBatch, embed_texts
    from llm2clip_scale.models.llm.lora import lora_adapters
    from llm2clip_scale.models.llm.tower import build_text_tower
    from llm2clip_scale.train.llm2clip_cc import build_lora_tower

    init_distributed("gloo")
    cfg1 = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", stage1_overrides(data, out / "unused", 1))
    cfg2 = load_config(REPO / "configs" / "tiny_cpu.yaml",
                       tiny_overrides(data, out / "unused", 1, f"model.llm.lora_init={stage1}"))
    texts = TextBatch(*tokenize_captions(load_tokenizer(cfg2.model.llm.tokenizer), CAPTIONS, max_len=64))
    result: dict = {}
    for tp, pp in ((2, 1), (1, 2)):
        build_topology(tp, pp)
        stage1_model, _ = build_lora_tower(cfg1, torch.float32, torch.device("cpu"), lora=stage1, trainable=False)
        merged = build_text_tower(cfg2.model.llm)
        untuned = build_text_tower(dataclasses.replace(cfg2.model.llm, lora_init=None))
        result[f"tp{tp}pp{pp}"] = {
            "stage1": embed_texts(stage1_model, texts), "merged": embed_texts(merged, texts),
            "untuned": embed_texts(untuned, texts), "adapters_left": len(lora_adapters(merged)),
            "trainable": sum(p.requires_grad for p in merged.parameters()),
        }
        parallel_state.destroy_model_parallel()

    # Offline: the sidecars of the eval shard, embedded at TP=2 with the LoRA merged.
    offline = dataclasses.replace(cfg2, parallel=dataclasses.replace(cfg2.parallel, tensor_parallel=2))
    load_script("embed_captions").embed_captions(offline, [f"{data}/eval-000000.tar"], out / "sidecars",
                                                 fields=["short"], dtype="float32")
    build_topology(2, 1)
    stage1_model, _ = build_lora_tower(cfg1, torch.float32, torch.device("cpu"), lora=stage1, trainable=False)
    data_cfg = dataclasses.replace(cfg2.data, eval_embedding_shards=f"{out}/sidecars/eval-000000.tar")
    batch = next(iter(build_eval_loader(data_cfg, None, 32, 16, 0, 1, None, 64, "short", embedding_dim=128)))
    captions = TextBatch(*tokenize_captions(load_tokenizer(cfg2.model.llm.tokenizer), batch["captions"], max_len=64))
    result["sidecar"] = {"stage1": embed_texts(stage1_model, captions), "stored": batch["llm_embeddings"]}
    return result


@pytest.fixture(scope="module")
def chained(tiny_data: Path, tiny_stage1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_chaining_worker, 2, tiny_data, tiny_stage1_checkpoint, tmp_path_factory.mktemp("chain"))


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_merged_stage1_lora_reproduces_the_stage1_model(chained: list[dict], layout: str) -> None:
    for rank in chained:
        run = rank[layout]
        assert run["adapters_left"] == 0 and run["trainable"] == 0  # merged into the weights, frozen
        assert _rel(run["merged"], run["stage1"]) <= TOL
        # The LoRA moved the tower: the comparison above could not pass with the base weights alone.
        assert _rel(run["untuned"], run["stage1"]) > 100 * TOL


def test_offline_sidecars_hold_the_stage1_models_embeddings(chained: list[dict]) -> None:
    sidecar = chained[0]["sidecar"]
    assert sidecar["stored"].shape == (16, 128)
    assert _rel(sidecar["stored"], sidecar["stage1"]) <= TOL


def test_lora_init_is_checked_before_training(tiny_data: Path, tiny_stage1_checkpoint: Path, tmp_path: Path) -> None:
    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.load import ConfigError, validate

    def problems(*extra: str) -> str:
        cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", tiny_overrides(tiny_data, tmp_path, 1, *extra))
        with pytest.raises(ConfigError) as err:
            validate(cfg, 2)
        return str(err.value)

    assert "lora.safetensors" in problems(f"model.llm.lora_init={tmp_path}/nowhere")
    assert "caption_format=plain" in problems("model.llm.caption_format=llm2vec")  # the synthetic word tokenizer
    assert "unknown" in problems("model.llm.caption_format=chatml")
    validate(load_config(REPO / "configs" / "tiny_cpu.yaml",
                         tiny_overrides(tiny_data, tmp_path, 1, f"model.llm.lora_init={tiny_stage1_checkpoint}")), 2)
