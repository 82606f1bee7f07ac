"""The eval tasks end to end on 2 gloo ranks: periodic eval during a tiny stage-2 run, then `llm2clip-scale eval`
on its checkpoint, checked against the metric functions applied to features computed here in one piece."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides
from tests.multiprocess import run_on_ranks

TASKS = "long_retrieval,retrieval,zeroshot,cra"
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")


def _eval_split(data: Path) -> list[tuple[dict, bytes]]:
    with tarfile.open(data / "eval-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in members})
    return [(json.loads(members[f"{k}.json"]), members[f"{k}.png"]) for k in keys]


def _reference(task, data: Path) -> dict:
    """Every metric from features of the whole split computed in one batch on this rank (TP=1: no collective)."""
    import torch
    from PIL import Image

    from llm2clip_scale.data.prompts import tokenize_captions
    from llm2clip_scale.data.samples import ImageTransform, load_tokenizer
    from llm2clip_scale.eval.cra import caption_retrieval_accuracy
    from llm2clip_scale.eval.multi_caption import multi_caption_recall
    from llm2clip_scale.eval.retrieval import retrieval_recall
    from llm2clip_scale.eval.tasks import load_zeroshot_classes
    from llm2clip_scale.eval.zeroshot import class_prompts, zeroshot_accuracy, zeroshot_classifier
    from llm2clip_scale.models.llm.embed import embed_local_batch

    cfg, model, tower = task.cfg, task.engine.module, task.step_fn.text_tower
    tokenizer = load_tokenizer(cfg.model.llm.tokenizer)
    transform = ImageTransform(cfg.model.vision.image_size, cfg.data.image_mean, cfg.data.image_std, "none", None)
    split = _eval_split(data)

    def images(pngs: list[bytes]) -> torch.Tensor:
        return model.encode_image(torch.stack([transform(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]))

    def llm(captions: list[str]) -> torch.Tensor:
        ids, mask, pool = tokenize_captions(tokenizer, captions, cfg.model.llm.caption_format, max_len=96)
        return embed_local_batch(tower, ids, mask, None, pool_mask=pool)

    task.engine.eval()
    with torch.no_grad():
        all_images = images([png for _, png in split])
        out = retrieval_recall(all_images, model.encode_text(llm([m["long"] for m, _ in split])), ks=(1, 5, 10))
        captions = [c for m, _ in split for c in m["captions"]]
        owner = torch.tensor([i for i, (m, _) in enumerate(split) for _ in m["captions"]])
        multi = multi_caption_recall(all_images, model.encode_text(llm(captions)), owner)
        out.update({f"retrieval/{k}": v for k, v in multi.items()})
        classes, templates = load_zeroshot_classes(data / "zeroshot.json")
        prompts = model.encode_text(llm(class_prompts(classes, templates))).reshape(len(classes), len(templates), -1)
        labelled = [(m["label"], png) for m, png in split if "label" in m]
        zero = zeroshot_accuracy(images([png for _, png in labelled]), zeroshot_classifier(prompts),
                                 torch.tensor([label for label, _ in labelled]))
        out.update({f"zeroshot/{k}": v for k, v in zero.items()})
        cra = caption_retrieval_accuracy(llm([m["captions"][0] for m, _ in split]),
                                         llm([m["captions"][1] for m, _ in split]))
        out.update({"cra/top1": cra, "cra/num_pairs": len(split)})
    return out


def _train_then_eval(data: Path, run_dir: Path) -> dict:
    from llm2clip_scale.checkpoint.layout import CheckpointError
    from llm2clip_scale.cli import main
    from llm2clip_scale.config import load_config
    from llm2clip_scale.eval.run import build_stage2
    from llm2clip_scale.train.stage2 import train_stage2

    overrides = tiny_overrides(data, run_dir, 2, "eval.interval=1", f"eval.tasks=[{TASKS}]")
    trained = train_stage2(load_config(CONFIG, overrides))
    task, info = build_stage2(load_config(CONFIG, overrides), str(run_dir / "ckpt"))
    reference, evaluated = _reference(task, data), task.evaluate()
    # TP=2: both ranks hold different captions and embed them together (the padded, equal-length shares keep both
    # in every collective); the frozen tower is the TP=1 function, so the metrics must not move.
    tp2, _ = build_stage2(load_config(CONFIG, [*overrides, "parallel.tensor_parallel=2"]), str(run_dir / "ckpt"))
    evaluated_tp2 = tp2.evaluate()
    # PP=2 (the last stage's embeddings broadcast to the first) under ZeRO-2, from the ZeRO-1 checkpoint (DeepSpeed's
    # universal conversion): the same function again.
    pp2 = ["parallel.pipeline_parallel=2"]
    evaluated_pp2 = build_stage2(load_config(CONFIG, [*overrides, *pp2, "parallel.zero_stage=2"]),
                                 str(run_dir / "ckpt"))[0].evaluate()
    # ZeRO-3 (the vision tower and adapter gathered parameter by parameter in every forward) does not load a ZeRO-1
    # checkpoint, and says so; as built (the seed's weights) it evaluates as the ZeRO-1, TP=1 model does.
    try:
        build_stage2(load_config(CONFIG, [*overrides, *pp2, "parallel.zero_stage=3"]), str(run_dir / "ckpt"))
        zero3_refused = ""
    except CheckpointError as err:
        zero3_refused = str(err)
    initial = build_stage2(load_config(CONFIG, overrides))[0].evaluate()
    initial_pp2_zero3 = build_stage2(load_config(CONFIG, [*overrides, *pp2, "parallel.zero_stage=3"]))[0].evaluate()
    code = main(["eval", CONFIG, *overrides, "--tasks", TASKS, "--checkpoint", str(run_dir / "ckpt")])
    return {"trained": trained, "info": info, "reference": reference, "evaluated": evaluated, "code": code,
            "evaluated_tp2": evaluated_tp2, "evaluated_pp2": evaluated_pp2, "zero3_refused": zero3_refused,
            "initial": initial, "initial_pp2_zero3": initial_pp2_zero3}


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    tmp_path = tmp_path_factory.mktemp("eval_run")
    return run_on_ranks(_train_then_eval, 2, tiny_data, tmp_path), tmp_path


def test_eval_tasks_during_training_and_from_the_cli(run: tuple[list[dict], Path]) -> None:
    results, tmp_path = run
    first = results[0]
    assert first["code"] == 0 and first["info"] == {"checkpoint": str(tmp_path / "ckpt" / "step2"), "step": 2}
    evaluated, reference = first["evaluated"], first["reference"]
    for rank in results[1:]:  # every rank reports the same metrics, and they are those of the reference features
        assert rank["evaluated"] == evaluated and rank["reference"] == pytest.approx(reference, abs=1e-6)
    assert evaluated.keys() == reference.keys() | {"chance", "num_samples", "retrieval/chance", "cra/chance"}
    for key, value in reference.items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key
    assert first["evaluated_tp2"] == pytest.approx(evaluated, abs=1e-6)
    assert first["evaluated_pp2"] == pytest.approx(evaluated, abs=1e-6)
    assert "saved under parallel.zero_stage=1 (by 2 rank(s)); this run has zero_stage=3 (2 rank(s))" in (
        first["zero3_refused"])
    assert first["initial_pp2_zero3"] == pytest.approx(first["initial"], abs=1e-6)
    assert first["initial"] != pytest.approx(evaluated, abs=1e-6)  # the trained model scores differently
    assert evaluated["num_samples"] == 32 and evaluated["retrieval/num_captions"] == 160
    assert 0 < evaluated["zeroshot/num_samples"] < 32 and evaluated["zeroshot/num_classes"] == 18
    for key in ("r1_i2t", "r10_t2i", "retrieval/r1_i2t", "retrieval/r5_t2i", "zeroshot/top1", "cra/top1"):
        assert 0.0 <= evaluated[key] <= 1.0
    # The CLI wrote the same metrics, with the checkpoint it evaluated.
    written = json.loads((tmp_path / "logs" / "eval.json").read_text())
    assert written["step"] == 2 and written["tasks"] == TASKS.split(",")
    assert {k: written[k] for k in evaluated} == evaluated
    # Periodic eval: the loop logged every task at step 1, and the final metrics at step 2 match the CLI's.
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evals) == [1, 2] and evals[1].keys() == evaluated.keys()
    assert evals[2] == evaluated and {k: first["trained"][k] for k in evaluated} == evaluated


def test_eval_of_the_hf_export_matches_the_checkpoint(run: tuple[list[dict], Path], tiny_data: Path) -> None:
    results, tmp_path = run
    export = tmp_path / "export"
    convert = [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), str(tmp_path / "ckpt"), str(export),
               "--no-verify"]
    subprocess.run(convert, check=True, capture_output=True, cwd=REPO, timeout=600)
    overrides = tiny_overrides(tiny_data, tmp_path / "from_export", 2, f"eval.tasks=[{TASKS}]")
    command = [sys.executable, "-m", "llm2clip_scale", "eval", CONFIG, *overrides, "--export", str(export)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "from_export" / "logs" / "eval.json").read_text())
    # The same weights through stock transformers + timm and the export's own preprocessing: the same metrics.
    evaluated = results[0]["evaluated"]
    assert {k: printed[k] for k in evaluated} == pytest.approx(evaluated, abs=1e-6)
