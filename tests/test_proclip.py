"""ProCLIP end to end on tiny sizes: the reference CLIP script, stage 1 on 2 gloo ranks, and the stage-2 warm start.

One module-scoped reference CLIP (3 steps) serves every test: the point here is that files are written, load, and
are what the next stage starts from — quality is measured by the full tiny pipeline, not by tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2clip_scale.config import load_config
from llm2clip_scale.config.load import ConfigError, validate
from llm2clip_scale.data.loader import load_tokenizer
from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset
from tests.conftest import TINY_VISION, load_script
from tests.multiprocess import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
# A smaller tower than tiny_cpu.yaml's, shared by the reference CLIP and stage 2 so the trunk loads strictly.
VISION = TINY_VISION


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    build_synthetic_dataset(out, SyntheticParams(train_samples=256, eval_samples=32, image_size=32,
                                                 samples_per_shard=128, seed=0))
    return out


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    script = load_script("train_reference_clip")
    out = tmp_path_factory.mktemp("reference") / "clip"
    params = script.ReferenceParams(steps=3, batch=8, warmup=1, eval_samples=16, num_workers=0)
    metrics = script.train_reference_clip(dataset, out, params, overrides=VISION)
    return out, metrics


def _overrides(data: Path, ref: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"data.train_shards={data}/train-{{000000..000001}}.tar",
        f"data.eval_shards={data}/eval-000000.tar",
        f"model.llm.tokenizer={data}/tokenizer",
        *VISION,
        "data.num_workers=0",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.global_batch=32",
        "train.micro_batch=8",  # 2 accumulation micro-steps per optimizer step on 2 ranks
        "eval.max_samples=32",
        f"proclip.teacher_text={ref}/text",
        f"checkpoint.dir={run_dir}/ckpt",
        f"logging.dir={run_dir}/logs",
        "logging.interval=1",
        "logging.progress_bar=false",
    ]


def _stage1(overrides: list[str]) -> dict:
    from llm2clip_scale.train import run_training

    return run_training(load_config(REPO / "configs" / "proclip_inherit_tiny.yaml", overrides))


def _stage2(overrides: list[str]) -> dict:
    from llm2clip_scale.train import run_training

    return run_training(load_config(REPO / "configs" / "proclip_stage2_tiny.yaml", overrides))


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()]).clone()


def _stage2_recording_ema(runs: list[list[str]]) -> list[dict]:
    """Stage-2 runs in one pair of rank processes (process start-up is most of a tiny run's time), each recording
    its EMA teacher: its state before step 1, and after every micro-step whether that micro-step was an accumulation
    boundary, the teacher and the student's vision tower (flattened, in parameter order: EMATeacher.update's zip)."""
    from llm2clip_scale.train import stage2

    original = stage2.Stage2Step.__call__
    records: list[dict] = []

    def recording(self, batch: dict) -> float:
        if "start" not in records[-1]:
            records[-1]["start"] = {k: v.clone() for k, v in self.teacher.teacher.state_dict().items()}
            records[-1]["start_flat"] = _flat(self.teacher.teacher)
        boundary = self.engine.is_gradient_accumulation_boundary()
        loss = original(self, batch)
        records[-1]["micro"].append((boundary, _flat(self.teacher.teacher), _flat(self.engine.module.vision)))
        return loss

    stage2.Stage2Step.__call__ = recording
    results = []
    for overrides in runs:
        records.append({"micro": []})
        results.append({**_stage2(overrides), **records[-1]})
    return results


def _scalars(log_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_reference_clip_files_load_exactly(reference: tuple[Path, dict], dataset: Path) -> None:
    from llm2clip_scale.config.schema import VisionConfig
    from llm2clip_scale.models.clip_text import load_clip_text_teacher
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower
    from llm2clip_scale.models.warm_start import load_vision_head

    out, metrics = reference
    assert metrics["num_samples"] == 16
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    saved = load_file(str(out / "vision.safetensors"))
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", VISION)
    vision = VisionConfig(**{**vars(cfg.model.vision), "pretrained_path": str(out / "vision.safetensors")})
    tower = build_vision_tower(vision, cfg.model.embed_dim)  # strict: every trunk key must come from the file
    trunk = tower.trunk.state_dict()
    assert set(trunk) == {k for k in saved if not k.startswith("head.")}
    for key, value in trunk.items():
        assert torch.equal(value, saved[key]), key
    load_vision_head(tower.head, out / "vision.safetensors")
    assert torch.equal(tower.head.weight, saved["head.weight"]) and torch.equal(tower.head.bias, saved["head.bias"])

    teacher = load_clip_text_teacher(out / "text")
    assert teacher.embed_dim == cfg.model.embed_dim
    assert not any(p.requires_grad for p in teacher.parameters())
    captions = ["a small red circle", "two shapes on a gray background. a large blue square is in the center."]
    embeds = teacher.encode(captions)
    assert embeds.shape == (2, cfg.model.embed_dim)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    # The saved tokenizer is the data's: token ids from the loader's tokenizer give the same embeddings.
    encoded = load_tokenizer(str(dataset / "tokenizer"))(captions, padding="longest", return_tensors="pt")
    assert torch.allclose(teacher(encoded["input_ids"], encoded["attention_mask"]), embeds, atol=1e-6)

    # The reported recall is the saved model's: recomputed from the files on the same 16 eval samples.
    from transformers import CLIPTextModelWithProjection

    script = load_script("train_reference_clip")
    reloaded = script.ReferenceCLIP(tower, CLIPTextModelWithProjection.from_pretrained(out / "text"))
    recomputed = script.evaluate_reference(reloaded, script._data_config(cfg, dataset), 16)
    assert {k: metrics[k] for k in recomputed} == recomputed


def test_stage1_trains_and_stage2_starts_from_its_adapter(
    reference: tuple[Path, dict], dataset: Path, tmp_path: Path
) -> None:
    from llm2clip_scale.models.adapter import LLMAdapter
    from llm2clip_scale.models.clip import build_clip_model

    ref, _ = reference
    steps = 12
    results = run_on_ranks(_stage1, 2, _overrides(dataset, ref, tmp_path / "s1", steps))
    losses = _scalars(tmp_path / "s1" / "logs" / "proclip_inherit", "train/loss")
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    ins = _scalars(tmp_path / "s1" / "logs" / "proclip_inherit", "train/l_ins")
    struct = _scalars(tmp_path / "s1" / "logs" / "proclip_inherit", "train/l_struct")
    assert losses[0] == pytest.approx(ins[0] + struct[0], rel=1e-6)  # both weights are 1.0
    for key in ("cos_agreement", "r1_s2t", "final_loss"):
        assert results[0][key] == results[1][key]  # every rank reports the same metrics
    assert results[0]["num_samples"] == 32
    assert results[0]["cos_agreement"] > results[0]["cos_unpaired"]
    adapter_file = tmp_path / "s1" / "ckpt" / "adapter.safetensors"
    assert results[0]["adapter"] == str(adapter_file)
    state = load_file(str(adapter_file))

    # The file loads into stage 2's model (model.adapter_init): same function as the stage-1 adapter.
    cfg2 = load_config(REPO / "configs" / "proclip_stage2_tiny.yaml", [
        *VISION, f"model.adapter_init={adapter_file}", "model.vision.pretrained_path=null",
        f"model.vision_head_init={ref}/vision.safetensors",
    ])
    stage1_adapter = LLMAdapter(cfg2.model.adapter, cfg2.model.embed_dim)
    stage1_adapter.load_state_dict(state)
    model = build_clip_model(cfg2.model)
    x = torch.randn(5, cfg2.model.adapter.input_dim)
    with torch.no_grad():
        assert torch.equal(model.adapter(x), stage1_adapter(x))
        fresh = LLMAdapter(cfg2.model.adapter, cfg2.model.embed_dim)
        assert not torch.allclose(fresh(x), stage1_adapter(x))
    assert torch.equal(model.vision.head.weight, load_file(str(ref / "vision.safetensors"))["head.weight"])

    # Stage 2 through the real entry point with lr 0: its final checkpoint still holds the warm-start weights, so the
    # engine really trained from them. A second run in the same processes trains (lr 1e-3) for 2 optimizer steps of 2
    # micro-steps each, with an EMA momentum whose swap (m <-> 1 - m) would show, to check the teacher's updates.
    run = tmp_path / "s2"
    warm = [f"model.adapter_init={adapter_file}", f"model.vision.pretrained_path={ref}/vision.safetensors",
            f"model.vision_head_init={ref}/vision.safetensors"]
    overrides = [*_overrides(dataset, ref, run, steps=1), "optim.lr=0.0", *warm]
    momentum = 0.75
    trained = [*_overrides(dataset, ref, tmp_path / "s2_ema", steps=2), *warm, f"train.ema_momentum={momentum}"]
    results = run_on_ranks(_stage2_recording_ema, 2, [overrides, trained])
    stage2, ema = [rank[0] for rank in results], [rank[1] for rank in results]
    assert stage2[0]["num_samples"] == 32
    module = torch.load(run / "ckpt" / "step1" / "vision" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    with torch.no_grad():
        stage2_adapter = LLMAdapter(cfg2.model.adapter, cfg2.model.embed_dim)
        stage2_adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in module.items()
                                        if k.startswith("adapter.")})
        assert torch.equal(stage2_adapter(x), stage1_adapter(x))
    vision = load_file(str(ref / "vision.safetensors"))
    for key, value in vision.items():
        assert torch.equal(module[f"vision.{key if key.startswith('head.') else 'trunk.' + key}"], value), key

    # The EMA teacher (ProCLIP's self-distillation target) starts from the warm-start image encoder on every rank.
    for record in ema:
        assert record["start"].keys() == {key if key.startswith("head.") else f"trunk.{key}" for key in vision}
        for key, value in vision.items():
            assert torch.equal(record["start"][key if key.startswith("head.") else f"trunk.{key}"], value), key
    # Then it moves once per optimizer step, after the accumulation boundary: teacher <- m * teacher + (1 - m) *
    # student-after-the-step; the micro-step before a boundary leaves it as it was. Every rank holds the same teacher.
    micro = ema[0]["micro"]
    assert [boundary for boundary, _, _ in micro] == [False, True, False, True]
    teacher = ema[0]["start_flat"]
    for index, (boundary, after, student) in enumerate(micro):
        assert torch.equal(after, ema[1]["micro"][index][1]), index
        if not boundary:
            assert torch.equal(after, teacher), index
            continue
        expected = (momentum * teacher.double() + (1 - momentum) * student.double()).float()
        print(f"micro-step {index}: |student - teacher| max {float((student - teacher).abs().max()):.3g}, "
              f"|teacher - (m t + (1 - m) s)| max {float((after - expected).abs().max()):.3g}")
        # lerp vs the float64 reference: rounding, ~1 ulp of the weights (measured 2e-10 at most). A skipped, doubled
        # or m <-> 1 - m update is off by ~(1 - m) |s - t| (measured |s - t| ~1e-3): 5 orders of magnitude above.
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-8)
        teacher = after


def test_stage1_config_is_validated(dataset: Path, tmp_path: Path) -> None:
    base = [f"data.train_shards={dataset}/train-000000.tar", f"model.llm.tokenizer={dataset}/tokenizer",
            "data.eval_shards=null"]
    with pytest.raises(ConfigError, match="proclip.teacher_text"):
        validate(load_config(REPO / "configs" / "proclip_inherit_tiny.yaml",
                             [*base, f"proclip.teacher_text={tmp_path}/none"]), world_size=2)
    with pytest.raises(ConfigError, match="model.adapter_init"):
        validate(load_config(REPO / "configs" / "tiny_cpu.yaml",
                             [*base, f"model.adapter_init={tmp_path}/adapter.safetensors"]), world_size=2)


def test_agreement_metrics() -> None:
    from llm2clip_scale.train.proclip_inherit import agreement_metrics

    teacher = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    perfect = agreement_metrics(3.0 * teacher, teacher)  # scale does not matter: both sides are normalised
    assert perfect["cos_agreement"] == pytest.approx(1.0) and perfect["r1_s2t"] == 1.0
    assert perfect["eval_l_ins"] == pytest.approx(0.0, abs=1e-6)
    shuffled = agreement_metrics(teacher.roll(1, dims=0), teacher)
    assert shuffled["r1_s2t"] == 0.0 and shuffled["cos_agreement"] < 0.99
