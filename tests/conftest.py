"""Fixtures shared by the resume, checkpoint, loop, chaining and export tests: one tiny data set, its offline
sidecars, a tiny reference CLIP (the ProCLIP teacher) and a tiny LLM2CLIP stage-1 checkpoint, each built once per
session."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
# The vision tower of every tiny run here (smaller than tiny_cpu.yaml's), shared with the reference CLIP so that
# ProCLIP's warm starts load strictly.
TINY_VISION = [
    "model.vision.image_size=32",
    "model.vision.timm_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 4}",
]


def tiny_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """A short 2-rank run on ``tiny_data``: 16 samples a step, one micro-batch of 8 per rank, a checkpoint dir and
    logs under ``run_dir`` (metrics.jsonl, no TensorBoard)."""
    return [
        f"data.train_shards={data}/train-{{000000..000003}}.tar",
        f"data.eval_shards={data}/eval-000000.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        *TINY_VISION,
        "data.num_workers=0",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch=16",
        "train.micro_batch=8",
        "eval.max_samples=32",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step line in ``<run_dir>/logs/metrics.jsonl`` (``tiny_overrides``' layout), in order:
    a resumed run appends, so ``dict()`` of this keeps the redone steps' later lines."""
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def load_script(name: str):
    """A data_prep/ script as a module (they are scripts, not package modules)."""
    path = REPO / "data_prep" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    build_synthetic_dataset(out, SyntheticParams(train_samples=256, eval_samples=32, image_size=32,
                                                 samples_per_shard=64, seed=1))
    return out


def _embed_sidecars(data: Path, out: Path) -> None:
    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.load import expand_shards
    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [
        f"data.train_shards={data}/train-{{000000..000003}}.tar", f"data.eval_shards={data}/eval-000000.tar",
        f"model.llm.tokenizer={data}/tokenizer",
    ])
    urls = expand_shards(cfg.data.train_shards) + expand_shards(cfg.data.eval_shards)
    load_script("embed_captions").embed_captions(cfg, urls, out, dtype="float32")


@pytest.fixture(scope="session")
def tiny_sidecars(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.multiprocess import run_on_ranks

    out = tmp_path_factory.mktemp("tiny_sidecars")
    run_on_ranks(_embed_sidecars, 1, tiny_data, out)
    return out


@pytest.fixture(scope="session")
def tiny_reference_clip(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = load_script("train_reference_clip")
    out = tmp_path_factory.mktemp("tiny_reference") / "clip"
    params = script.ReferenceParams(steps=3, batch=8, warmup=1, eval_samples=16, num_workers=0)
    script.train_reference_clip(tiny_data, out, params, overrides=TINY_VISION)
    return out


def stage1_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """A short 2-rank LLM2CLIP stage-1 run (configs/llm2clip_cc_tiny.yaml) on ``tiny_data``: 16 pairs a step."""
    return [
        f"data.train_shards={data}/train-{{000000..000003}}.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        "stage1.eval_pairs=null",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch=16",
        "train.micro_batch=4",
        "data.max_text_len=64",
        "optim.lr=5.0e-3",  # large enough that a few steps move the LoRA far from its zero start
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _train_stage1(overrides: list[str]) -> dict:
    from llm2clip_scale.config import load_config
    from llm2clip_scale.train.llm2clip_cc import train_llm2clip_cc

    return train_llm2clip_cc(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides))


@pytest.fixture(scope="session")
def tiny_stage1_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint root of a 3-step, 2-rank LLM2CLIP stage-1 run (LoRA r=16 on every projection) on tiny_data."""
    from tests.multiprocess import run_on_ranks

    run_dir = tmp_path_factory.mktemp("tiny_stage1")
    run_on_ranks(_train_stage1, 2, stage1_overrides(tiny_data, run_dir, steps=3))
    return run_dir / "ckpt"
