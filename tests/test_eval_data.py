"""Eval data: the synthetic set's paraphrases and zero-shot labels, and the eval-set reader (shards, jsonl, csv)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llm2clip_scale.data import synthetic
from llm2clip_scale.data.eval_sets import read_eval_set
from llm2clip_scale.data.samples import load_tokenizer
from llm2clip_scale.eval.tasks import captions_of, encode_split, load_zeroshot_classes


def _shard_samples(path: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_synthetic_eval_fields(tiny_data: Path) -> None:
    samples = _shard_samples(tiny_data / "eval-000000.tar")
    tokenizer = load_tokenizer(str(tiny_data / "tokenizer"))
    classes, templates = load_zeroshot_classes(tiny_data / "zeroshot.json")
    assert classes == list(synthetic.ZEROSHOT_CLASSES) and len(classes) == 18
    labelled = 0
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        index = int(key.split("-")[1])
        # The older fields and the image are what they were before the eval fields existed: drawn from the sample's
        # RNG in the same order (scene, image, captions), untouched by the paraphrases' own RNG.
        rng = random.Random(f"llm2clip-synthetic/1/eval/{index}")
        scene = synthetic.sample_scene(rng)
        image = synthetic.render_scene(scene, 32, rng)
        assert {k: meta[k] for k in synthetic.CAPTION_FIELDS} == synthetic.describe_scene(scene, rng)
        png = io.BytesIO()
        image.save(png, format="PNG", optimize=False)
        assert sample["png"] == png.getvalue()
        captions = meta["captions"]
        assert len(captions) == synthetic.CAPTIONS_PER_SAMPLE == len(set(captions[:2])) + 3
        for caption in captions:  # every paraphrase names every object, in words the tokenizer knows
            assert all(f"{o['colour']} {o['shape']}" in caption for o in meta["objects"])
            assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"]
        if len(meta["objects"]) == 1:
            obj = meta["objects"][0]
            assert classes[meta["label"]] == f"{obj['colour']} {obj['shape']}"
            labelled += 1
        else:
            assert "label" not in meta
    assert 0 < labelled < len(samples)
    for prompt in (t.format(c) for c in classes for t in templates):
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]
    summary = json.loads((tiny_data / "dataset.json").read_text())
    assert summary["caption_fields"] == ["raw", "short", "long"] and summary["zeroshot"] == "zeroshot.json"


def test_reader_splits_images_over_ranks_and_filters(tiny_data: Path) -> None:
    source = str(tiny_data / "eval-000000.tar")
    everything = read_eval_set(source, lambda meta: True, 0, 1)
    assert len(everything) == 32 and everything.rejected == 0 and set(everything.images) == set(range(32))
    rank1 = read_eval_set(source, lambda meta: "label" in meta, 1, 2, max_samples=5)
    labelled = [m for m in everything.metas if "label" in m][:5]
    assert rank1.metas == labelled and set(rank1.images) == {1, 3}
    assert rank1.keys[1] == everything.keys[everything.metas.index(labelled[1])]
    with pytest.raises(ValueError, match="no usable record"):
        read_eval_set(source, lambda meta: False, 0, 1)
    with pytest.raises(ValueError, match="could not be read"):
        read_eval_set(str(tiny_data / "missing-{000000..000001}.tar"), lambda meta: True, 0, 1)


def _image_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reader_jsonl_and_csv(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        (tmp_path / "imgs" / f"{name}.png").write_bytes(_image_bytes(colour))
    rows = [{"image": "imgs/a.png", "captions": ["red one", "a red square"], "label": 0},
            {"image": "imgs/b.png", "captions": ["green one"], "label": 1}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    jsonl = read_eval_set(str(tmp_path / "set.jsonl"), lambda m: len(captions_of(m, "captions")) >= 1, 1, 2)
    assert jsonl.metas == [{"captions": ["red one", "a red square"], "label": 0}, {"captions": ["green one"],
                                                                                   "label": 1}]
    assert jsonl.images == {1: _image_bytes((0, 255, 0))}
    (tmp_path / "set.csv").write_text("image,caption,label\nimgs/a.png,red one,0\nimgs/b.png,green one,1\n"
                                      "imgs/a.png,a red square,0\n")
    from_csv = read_eval_set(str(tmp_path / "set.csv"), lambda m: True, 0, 1)
    assert from_csv.metas == jsonl.metas and set(from_csv.images) == {0, 1}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "imgs/missing.png", "captions": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="not found"):
        read_eval_set(str(tmp_path / "bad.jsonl"), lambda m: True, 0, 1)
    (tmp_path / "bad.csv").write_text("image,text\nimgs/a.png,red\n")
    with pytest.raises(ValueError, match="'caption'"):
        read_eval_set(str(tmp_path / "bad.csv"), lambda m: True, 0, 1)


def test_captions_of_and_encode_split_on_one_rank() -> None:
    import torch

    assert captions_of({"c": ["a ", "", 3, "b"]}, "c") == ["a", "b"] and captions_of({"c": " one "}, "c") == ["one"]
    assert captions_of({}, "c") == []
    rows = encode_split(5, lambda idx: torch.tensor(idx, dtype=torch.float).unsqueeze(1), 2, 0, 1)
    assert rows.flatten().tolist() == [0, 1, 2, 3, 4]


def test_an_older_synthetic_format_is_rebuilt_in_place(tmp_path: Path) -> None:
    params = synthetic.SyntheticParams(train_samples=3, eval_samples=2, image_size=16, samples_per_shard=4)
    out = tmp_path / "ds"
    synthetic.build_synthetic_dataset(out, params)
    shard = (out / "eval-000000.tar").read_bytes()
    summary = json.loads((out / "dataset.json").read_text())
    del summary["format"]  # as a dataset built before the eval fields existed records itself
    (out / "dataset.json").write_text(json.dumps(summary))
    rebuilt = synthetic.build_synthetic_dataset(out, params)
    assert not rebuilt.reused and rebuilt.summary["format"] == synthetic.FORMAT
    assert (out / "eval-000000.tar").read_bytes() == shard
    assert synthetic.build_synthetic_dataset(out, params).reused


class _ColourEncoders:
    """Images -> their mean RGB; captions -> a colour word's RGB axis: a model whose answers are known."""

    AXES = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}

    def images(self, images):
        import torch.nn.functional as F

        return F.normalize(images.mean(dim=(2, 3)) + 3.0, dim=-1)  # pixels in [-1, 1]: the lit channel leads

    def llm(self, captions):
        import torch

        return torch.tensor([next(v for k, v in self.AXES.items() if k in c) for c in captions])

    texts = llm


def _colour_set(tmp_path: Path):
    from llm2clip_scale.config import load_config

    (tmp_path / "imgs").mkdir()
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = []
    for name, rgb in colours.items():
        (tmp_path / "imgs" / f"{name}.png").write_bytes(_image_bytes(rgb))
        rows.append({"image": f"imgs/{name}.png", "caption": f"{name} thing", "captions": [f"a {name} thing",
                     f"the {name} one"], "label": list(colours).index(name)})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "zeroshot.json").write_text(json.dumps({"classes": list(colours), "templates": ["a {}", "{} thing"]}))
    cfg = load_config(None, [f"data.eval_shards={tmp_path}/set.jsonl", "data.eval_caption_field=caption",
                             "model.vision.image_size=8", "data.image_mean=[0.5,0.5,0.5]",
                             "data.image_std=[0.5,0.5,0.5]"])
    return cfg


def test_run_tasks_on_a_jsonl_set_and_a_corrupt_image(tmp_path: Path) -> None:
    from llm2clip_scale.eval.tasks import run_tasks

    cfg = _colour_set(tmp_path)
    metrics = run_tasks(["long_retrieval", "retrieval", "zeroshot", "cra"], cfg, _ColourEncoders())
    # Every image's mean colour points at its own colour word: all perfect.
    assert metrics["r1_i2t"] == metrics["retrieval/r1_t2i"] == metrics["zeroshot/top1"] == metrics["cra/top1"] == 1.0
    assert metrics["retrieval/num_captions"] == 6 and metrics["zeroshot/num_classes"] == 3
    (tmp_path / "imgs" / "green.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"do not decode: set\.jsonl:2"):
        run_tasks(["retrieval"], cfg, _ColourEncoders())


def test_a_missing_listed_image_fails_on_every_rank(tmp_path: Path) -> None:
    """Every rank checks every listed image, not only the ones it reads: a rank raising alone would leave the others
    in the eval's collectives."""
    from PIL import Image

    from llm2clip_scale.data.eval_sets import read_eval_set

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    listing = tmp_path / "set.jsonl"
    listing.write_text('{"image": "a.png", "captions": ["x"]}\n{"image": "gone.png", "captions": ["y"]}\n')
    for rank in (0, 1):  # record 1 is rank 1's to read; rank 0 must fail as well
        with pytest.raises(ValueError, match="gone.png not found"):
            read_eval_set(str(listing), lambda meta: True, rank, 2)
    bad_csv = tmp_path / "set.csv"
    bad_csv.write_text("image,caption\na.png,x\n,y\n")
    with pytest.raises(ValueError, match="needs an 'image' path"):
        read_eval_set(str(bad_csv), lambda meta: True, 0, 2)


def test_repeated_evaluation_reads_each_set_once_and_cra_reads_no_images(tmp_path: Path, monkeypatch) -> None:
    """Periodic eval keeps one EvalTasks: the second evaluation reads no file, and scores the same."""
    import llm2clip_scale.eval.tasks as tasks_module

    cfg = _colour_set(tmp_path)
    reads = []
    real_read = tasks_module.read_eval_set
    monkeypatch.setattr(tasks_module, "read_eval_set", lambda *a, **k: reads.append(k["what"]) or real_read(*a, **k))
    runner = tasks_module.EvalTasks(cfg, _ColourEncoders())
    all_tasks = ["long_retrieval", "retrieval", "zeroshot", "cra"]
    first = runner.run(all_tasks)
    assert sorted(reads) == sorted(f"eval {task} data" for task in all_tasks)
    for image in (tmp_path / "imgs").iterdir():
        image.unlink()  # the images are held (bytes of this rank's share): nothing is read again
    assert runner.run(all_tasks) == first and len(reads) == len(all_tasks)
    assert runner._sets["cra"].images == {} and len(runner._sets["retrieval"].images) == 3
    with pytest.raises(ValueError, match="is not one of long_retrieval, retrieval, zeroshot, cra"):
        runner.run(["rerieval"])
