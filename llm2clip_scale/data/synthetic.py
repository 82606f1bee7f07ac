"""A small, learnable, compositional image–caption set in webdataset shards, plus a tokenizer trained on it.

Each image shows 1–3 coloured shapes on a 3x3 grid over a plain background. Every sample's json carries three
caption fields that mimic what LLM2CLIP mixes: ``raw`` (terse alt-text that names one object), ``short`` (short
dense: every object with size, colour and shape) and ``long`` (long dense: positions and pairwise relations too).
The attribute space (6 colours x 3 shapes x 2 sizes x 9 cells, up to 3 objects, 3 backgrounds) is large enough that
most held-out multi-object scenes are novel, while every word is seen often: a tiny CLIP can learn it on CPU.
For evaluation (docs/EVAL.md) each json also lists five paraphrased ``captions`` and, for 1-object scenes, a zero-shot
``label`` (colour + shape; class names and prompt templates in ``zeroshot.json``).

Everything derives from ``seed``: sample ``i`` of a split gets its own RNG, so the same seed reproduces byte-identical
shards regardless of how many samples are asked for, and a changed eval size never changes the train split.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from llm2clip_scale.eval.task_config import ZEROSHOT_FILE  # the file name the zeroshot task looks for

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Object extent as a fraction of a grid cell; far apart so size is unambiguous even at 32 px.
SIZES: dict[str, float] = {"small": 0.45, "large": 0.9}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
CAPTION_FIELDS: tuple[str, ...] = ("raw", "short", "long")
# Evaluation extras (docs/EVAL.md): every sample's json also lists CAPTIONS_PER_SAMPLE paraphrases under
# MULTI_CAPTION_FIELD (multi-caption retrieval, CRA), and 1-object scenes carry LABEL_FIELD, the index of their
# "<colour> <shape>" in ZEROSHOT_CLASSES (zero-shot). Drawn from their own RNG, so the other fields, the images and
# the tokenizer are what they were before these existed.
MULTI_CAPTION_FIELD = "captions"
CAPTIONS_PER_SAMPLE = 5
LABEL_FIELD = "label"
# Bumped when a build adds content: 2 added the eval fields. A dataset of an older format with the same parameters
# is rebuilt without --force (its older fields and images come out byte-identical, so nothing is lost).
FORMAT = 2
SPLITS: tuple[str, ...] = ("train", "eval")
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_VOCAB = 256  # tiny CPU LLM configs use vocab_size 256; the tokenizer must fit inside it
_COUNT_WORDS = ("one", "two", "three")
ZEROSHOT_CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Templates use only caption words, so the tokenizer (trained on the caption fields) covers them.
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a {}", "a picture of a {}", "the {} on a background", "a {} in the picture")
_SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges without any drawing library beyond PIL
_TAR_MTIME = 0  # fixed tar member mtime so the same seed gives byte-identical shards


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def noun(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        # "middle center" reads badly; everything else is "<row> <column>".
        return "center" if (self.row, self.col) == (1, 1) else f"{ROWS[self.row]} {COLUMNS[self.col]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str


@dataclass(frozen=True)
class SyntheticParams:
    train_samples: int = 4000
    eval_samples: int = 500
    image_size: int = 64
    samples_per_shard: int = 500
    seed: int = 0


@dataclass(frozen=True)
class BuildResult:
    summary: dict
    reused: bool  # True when a complete dataset with the same parameters was already there


def sample_scene(rng: random.Random) -> Scene:
    """1–3 objects in distinct cells with distinct (colour, shape) so relation phrases name objects unambiguously."""
    count = rng.randint(1, 3)
    cells = rng.sample(range(9), count)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    objects = tuple(
        ShapeObject(shape=shape, colour=colour, size=rng.choice(tuple(SIZES)), row=cell // 3, col=cell % 3)
        for cell, (colour, shape) in zip(cells, kinds)
    )
    return Scene(objects=objects, background=rng.choice(tuple(BACKGROUNDS)))


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; a small random offset inside each cell keeps images varied without changing the captions."""
    canvas = image_size * _SUPERSAMPLE
    cell = canvas / 3
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        half = SIZES[obj.size] * cell / 2
        slack = cell / 2 - half  # how far the shape may move and still sit wholly in its cell
        cx = (obj.col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (obj.row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        draw_shape(draw, obj.shape, cx, cy, half, COLOURS[obj.colour])
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill: tuple) -> None:
    """One scene object: a circle, square or triangle of half-size ``half`` centred at (cx, cy)."""
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def describe_scene(scene: Scene, rng: random.Random) -> dict[str, str]:
    """The three caption fields of a scene."""
    return {"raw": _raw_caption(scene, rng), "short": _short_caption(scene), "long": _long_caption(scene)}


def _raw_caption(scene: Scene, rng: random.Random) -> str:
    # Alt-text is terse and incomplete: it names one object, sometimes without its colour.
    obj = rng.choice(scene.objects)
    template = rng.choice(("{noun}", "{noun}", "{shape}", "{noun} picture", "{noun} on {background}"))
    return template.format(noun=obj.noun, shape=obj.shape, background=scene.background)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _short_caption(scene: Scene) -> str:
    return _join([f"a {o.size} {o.noun}" for o in scene.objects])


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    horizontal = "left of" if a.col < b.col else "right of" if a.col > b.col else ""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    return " and ".join(p for p in (horizontal, vertical) if p)


def _long_caption(scene: Scene) -> str:
    count = len(scene.objects)
    plural = "shape" if count == 1 else "shapes"
    sentences = [f"a picture of {_COUNT_WORDS[count - 1]} {plural} on a {scene.background} background."]
    sentences += [f"a {o.size} {o.noun} is in the {o.position}." for o in scene.objects]
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            sentences.append(f"the {a.noun} is {_relation(a, b)} the {b.noun}.")
    return " ".join(sentences)


def paraphrase_captions(scene: Scene, rng: random.Random) -> list[str]:
    """CAPTIONS_PER_SAMPLE captions of one scene in different wordings and object orders (COCO-style references)."""
    objects = list(scene.objects)
    first, second = rng.sample(objects, len(objects)), rng.sample(objects, len(objects))
    count = len(objects)
    return [
        _join([f"a {o.size} {o.noun}" for o in first]),
        "a picture of " + _join([f"a {o.size} {o.noun}" for o in second]) + f" on a {scene.background} background",
        _join([f"a {o.noun} in the {o.position}" for o in first]),
        f"{_COUNT_WORDS[count - 1]} {'shape' if count == 1 else 'shapes'} on a {scene.background} background, "
        + _join([f"the {o.size} {o.noun}" for o in second]),
        _join([f"the {o.size} {o.noun} in the {o.position}" for o in second]),
    ]


def scene_label(scene: Scene) -> int | None:
    """Zero-shot class of a 1-object scene (index into ZEROSHOT_CLASSES); None when several objects make it unclear."""
    if len(scene.objects) != 1:
        return None
    return ZEROSHOT_CLASSES.index(scene.objects[0].noun)


def vocabulary_words() -> list[str]:
    """Every word the caption templates can produce, so the tokenizer covers eval even from a tiny train split."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(ROWS) | set(COLUMNS) | set(BACKGROUNDS) | set(_COUNT_WORDS)
    words |= {"a", "picture", "of", "shape", "shapes", "on", "background", "is", "in", "the", "and"}
    words |= {"left", "right", "above", "below", ",", "."}
    return sorted(words)


def make_sample(split: str, index: int, image_size: int, seed: int) -> dict:
    """One shard record: key, png bytes and json bytes. Its own RNG keeps it independent of the split's length."""
    rng = random.Random(f"llm2clip-synthetic/{seed}/{split}/{index}")
    scene = sample_scene(rng)
    image = render_scene(scene, image_size, rng)
    meta = {
        **describe_scene(scene, rng),
        "objects": [asdict(o) for o in scene.objects],
        "background": scene.background,
        MULTI_CAPTION_FIELD: paraphrase_captions(scene, random.Random(f"llm2clip-synthetic/{seed}/{split}/{index}/ev")),
    }
    label = scene_label(scene)
    if label is not None:
        meta[LABEL_FIELD] = label
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=False)
    return {
        "__key__": f"{split}-{index:07d}",
        "png": png.getvalue(),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _write_split(out_dir: Path, split: str, count: int, params: SyntheticParams) -> tuple[dict, list[dict]]:
    metas: list[dict] = []
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=params.samples_per_shard, verbose=0, mtime=_TAR_MTIME) as sink:
        for index in range(count):
            record = make_sample(split, index, params.image_size, params.seed)
            sink.write(record)
            metas.append(json.loads(record["json"]))
    shards = -(-count // params.samples_per_shard)
    info = {"samples": count, "shards": shards, "pattern": f"{split}-{{000000..{shards - 1:06d}}}.tar"}
    return info, metas


def train_tokenizer(captions: list[str], out_dir: Path) -> int:
    """Train a lower-case word-level fast tokenizer, save it for AutoTokenizer, and return its vocab size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False)
    tok.train_from_iterator([*captions, " ".join(vocabulary_words())], trainer=trainer)
    # BOS/EOS around every caption as Llama-style tokenizers do; the text tower mean-pools over real tokens.
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[BOS]", "[EOS]")],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        padding_side="right",
        model_max_length=512,
    )
    fast.save_pretrained(str(out_dir))
    return tok.get_vocab_size()


def _read_summary(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return None


def _seen_fraction(train: list[dict], held_out: list[dict]) -> float:
    """Share of held-out scenes whose long caption also occurs in train (only 1-object scenes repeat often)."""
    seen = {m["long"] for m in train}
    return round(sum(m["long"] in seen for m in held_out) / max(len(held_out), 1), 4)


def build_synthetic_dataset(out_dir: str | os.PathLike, params: SyntheticParams, force: bool = False) -> BuildResult:
    """Write shards, tokenizer and dataset.json into ``out_dir``, atomically (temp dir + rename).

    A complete dataset (dataset.json present) with the same parameters is reused unless ``force``. A directory that
    holds something else is never deleted without ``force``.
    """
    if params.train_samples < 1 or params.eval_samples < 1 or params.samples_per_shard < 1 or params.image_size < 8:
        raise ValueError(f"synthetic dataset: counts must be >= 1 and image_size >= 8, got {params}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a dataset directory")
    existing = _read_summary(out)
    same_params = existing is not None and existing.get("params") == asdict(params)
    if same_params and existing.get("format", 1) == FORMAT and not force:
        return BuildResult(summary=existing, reused=True)
    if out.exists() and any(out.iterdir()) and not force and not same_params:
        what = "a dataset with other parameters" if existing else "files that are not a complete dataset"
        raise FileExistsError(f"{out} holds {what}; pass force=True (--force) to replace it")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _build_into(tmp, params)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(summary=summary, reused=False)


def _build_into(tmp: Path, params: SyntheticParams) -> dict:
    splits: dict[str, dict] = {}
    metas: dict[str, list[dict]] = {}
    for split, count in zip(SPLITS, (params.train_samples, params.eval_samples)):
        splits[split], metas[split] = _write_split(tmp, split, count, params)
    train_captions = [m[field] for m in metas["train"] for field in CAPTION_FIELDS]
    vocab_size = train_tokenizer(train_captions, tmp / "tokenizer")
    if vocab_size >= MAX_VOCAB:
        raise RuntimeError(f"synthetic tokenizer has {vocab_size} tokens; the tiny test LLMs cover {MAX_VOCAB}")
    summary = {
        "params": asdict(params),
        "splits": splits,
        "caption_fields": list(CAPTION_FIELDS),
        "image_format": "png",
        "tokenizer": "tokenizer",
        "vocab_size": vocab_size,
        "seed": params.seed,
        "eval_long_caption_seen_in_train": _seen_fraction(metas["train"], metas["eval"]),
        "format": FORMAT,
        "multi_caption_field": MULTI_CAPTION_FIELD,
        "label_field": LABEL_FIELD,
        "zeroshot": ZEROSHOT_FILE,
    }
    zeroshot = {"classes": list(ZEROSHOT_CLASSES), "templates": list(ZEROSHOT_TEMPLATES)}
    (tmp / ZEROSHOT_FILE).write_text(json.dumps(zeroshot, indent=2) + "\n")
    # Written last: its presence is what marks the directory complete.
    (tmp / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
