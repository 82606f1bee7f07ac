"""LLM2CLIP stage-1 recipe options against hand-built references: a pair file row's own instruction, one source
per batch (LLM2Vec's batching of dataset mixes), random vs mined hard negatives, and MNTP as its own LoRA merged
into the base before a fresh SimCSE LoRA."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from llm2clip_scale.config.load import ConfigError, validate
from llm2clip_scale.config.schema import Config
from llm2clip_scale.data.pair_files import read_pair_file
from llm2clip_scale.data.pair_stream import PairBatches
from llm2clip_scale.data.pairs import CaptionPair, PairCollator, attach_hard_negatives, iter_caption_pairs
from llm2clip_scale.data.prompts import DEFAULT_INSTRUCTION, tokenize_captions
from llm2clip_scale.data.shards import SkipCounter
from tests.multiprocess import run_on_ranks
from tests.pair_batches import collate_groups, take

# ------------------------------------------------------------------------------------------ per-row instructions


def _tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (Llama-3-like: a word's leading space is part of its token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["find the answer: a dog on a mat", "a cat on the mat"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_a_pair_files_row_instruction_is_read_and_overrides_the_chosen_one(tmp_path: Path) -> None:
    rows = [
        {"query": "a dog", "positive": "a dog on a mat", "instruction": "find the answer: "},
        {"query": "a cat", "positive": "a cat on the mat"},  # no instruction: the collator chooses
        {"query": "a cat", "positive": "the mat", "instruction": "   "},  # blank: none given
        {"query": "a dog", "positive": "a mat", "instruction": 7},  # not a string: skipped, counted
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "pairs.csv"
    csv.write_text("query,positive,instruction\na dog,a dog on a mat,find the answer: \na cat,a cat on the mat,\n")
    skips = SkipCounter("t")
    pairs = list(read_pair_file(jsonl, skips))
    assert [p.instruction for p in pairs] == ["find the answer: ", None, None]
    assert skips.counts == {"bad_instruction": 1}
    assert [p.instruction for p in read_pair_file(csv, skips)] == ["find the answer: ", None]

    tok = _tokenizer()
    for configured in (None, "a mat: "):  # "auto" (direction-chosen; pair files have none: the default) and fixed
        batch = PairCollator(tok, configured, max_len=64)(pairs)
        expected = ["find the answer: ", configured or DEFAULT_INSTRUCTION, configured or DEFAULT_INSTRUCTION]
        ids, mask, pool = tokenize_captions(tok, [p.query for p in pairs], "plain", expected, 64)
        assert batch["query_input_ids"].tolist() == ids.tolist()
        assert batch["query_pool_mask"].tolist() == pool.tolist()
        # The row's instruction is excluded from pooling: only "<s> a dog </s>" pools in row 0.
        assert int(batch["query_pool_mask"][0].sum()) == len(tok("a dog")["input_ids"])


# ------------------------------------------------------------------------------------------ one source per batch


def _source_files(tmp_path: Path) -> list[Path]:
    """Two pair files of different sizes (the second ~2.5x the bytes) with recognisable groups (path@offset)."""
    paths = []
    for name, n, pad in (("alpha", 40, ""), ("beta", 60, " in a long description")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"query": f"{name} q {i}", "positive": f"{name} p {i}{pad * 3}"}) + "\n"
                                for i in range(n)))
        paths.append(path)
    return paths


def _cfg(source: str, seed: int = 5) -> Config:
    cfg = Config()
    cfg.data.train_shards = source
    cfg.data.shuffle_buffer = 10
    cfg.train.global_batch = 8  # 4 pairs per rank of 2
    cfg.train.seed = seed
    cfg.stage1.one_source_per_batch = True
    return cfg


def _source_of(batch: dict) -> str:
    names = {group.split("@")[0] for group in batch["groups"]}
    assert len(names) == 1, names  # every row of the batch from one source
    return names.pop()


def test_every_global_batch_comes_from_one_source_and_resumes_exactly(tmp_path: Path) -> None:
    paths = _source_files(tmp_path)
    cfg = _cfg("::".join(map(str, paths)))
    ranks = [iter(PairBatches(cfg, collate_groups, rank, 2, SkipCounter(f"r{rank}"))) for rank in range(2)]
    steps = 60
    batches = [take(stream, steps) for stream in ranks]
    sources = [[_source_of(b) for b in rank_batches] for rank_batches in batches]
    assert sources[0] == sources[1]  # the whole global batch (both DP ranks) is one source's
    counts = Counter(sources[0])
    sizes = [p.stat().st_size for p in paths]
    # Drawn in proportion to bytes: beta's expected share is 0.74; 60 draws land within 0.15 of it (seeded).
    assert abs(counts[str(paths[1])] / steps - sizes[1] / sum(sizes)) < 0.15, counts
    # Each source is read pass by pass: rank 0's first pass over alpha is exactly its share of alpha, each once.
    share = [p.group for p in iter_caption_pairs(str(paths[0]), SkipCounter("x"), rank=0, world_size=2, seed=5)]
    from_alpha = [g for b in batches[0] for g in b["groups"] if g.startswith(str(paths[0]))]
    assert len(from_alpha) >= len(share) and sorted(from_alpha[: len(share)]) == sorted(share)

    for k in (1, 17, 40):
        interrupted = PairBatches(cfg, collate_groups, 1, 2, SkipCounter("interrupted"))
        assert take(iter(interrupted), k) == batches[1][:k]
        resumed = PairBatches(cfg, collate_groups, 1, 2, SkipCounter("resumed"))
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        read = _count_reads(resumed)
        stream = iter(resumed)
        assert take(stream, 1) == batches[1][k : k + 1], k
        # Up to its first batch the resume re-read at most the current pass of each source (rank 1's shares: 20
        # and 30 pairs), plus one batch and the shuffle buffers' read-ahead; not every batch since the start.
        assert sum(read.values()) <= 20 + 30 + 4 + 2 * cfg.data.shuffle_buffer, (k, read)
        assert take(stream, 4) == batches[1][k + 1 : k + 5], k
    assert 40 * 4 > 20 + 30 + 4 + 2 * cfg.data.shuffle_buffer  # k=40: a replay from the start would break the bound


def _count_reads(stream: PairBatches) -> Counter:
    """Count the pairs ``stream`` reads from its files, by source."""
    reads: Counter = Counter()
    read_pairs = stream._pairs

    def counting(source: str, seed: int):
        for pair in read_pairs(source, seed):
            reads[source] += 1
            yield pair

    stream._pairs = counting
    return reads


def test_a_source_without_pairs_in_a_ranks_share_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n" * 500)  # as many bytes as the good file: drawn often
    cfg = _cfg(f"{_source_files(tmp_path)[0]}::{empty}", seed=0)
    cfg.data.shuffle_buffer = 1
    with pytest.raises(ValueError, match="source 1 .* has no good pairs"):
        take(iter(PairBatches(cfg, collate_groups, 0, 2, SkipCounter("t"))), 30)


# ---------------------------------------------------------------------------------------------- random negatives


def _captions(g: int) -> list[str]:
    """Image g's three captions: words w_g..w_{g+4}, so images g and h share max(0, 5 - |g - h|) of them."""
    return [f"image{g} " + " ".join(f"w{j}" for j in range(g, g + 5)) + f" variant{c}" for c in range(3)]


def _grouped_pairs() -> list[CaptionPair]:
    """12 images with 3 pairs each (three captions of one image pair up differently), interleaved in the stream."""
    return [CaptionPair(_captions(g)[k], _captions(g)[(k + 1) % 3], None, f"img{g}") for k in range(3)
            for g in range(12)]


def _negatives(mode: str, seed: int) -> list[CaptionPair]:
    skips = SkipCounter("t")
    out = list(attach_hard_negatives(_grouped_pairs(), random.Random(seed), skips, window=8, mode=mode))
    assert not skips.counts
    return out


def test_random_negatives_are_never_the_pairs_own_image_and_follow_the_seed() -> None:
    own = {f"img{g}": set(_captions(g)) for g in range(12)}
    random_mode = _negatives("random", 1)
    assert len(random_mode) == 36
    for pair in random_mode:
        assert pair.negative is not None and pair.negative not in own[pair.group]
        assert pair.negative in set().union(*own.values())
    assert _negatives("random", 1) == random_mode  # deterministic under the seed
    assert _negatives("random", 2) != random_mode
    # Mined: the most words shared with the positive, i.e. a neighbouring image (the window always holds one);
    # random mode draws from the whole window instead, so it takes farther images too.
    def gaps(pairs: list[CaptionPair]) -> list[int]:
        return [abs(int(p.negative.split()[0][5:]) - int(p.group[3:])) for p in pairs]

    assert set(gaps(_negatives("mined", 1))) == {1}
    assert max(gaps(random_mode)) > 1
    with pytest.raises(ValueError, match="mode 'nearest' unknown"):
        list(attach_hard_negatives(_grouped_pairs(), random.Random(0), SkipCounter("t"), mode="nearest"))


def test_the_negative_mode_reaches_the_stream_and_bad_modes_are_refused(tmp_path: Path) -> None:
    path = _source_files(tmp_path)[0]
    cfg = _cfg(str(path))
    cfg.stage1.one_source_per_batch = False
    cfg.stage1.negative_mode = "random"
    batch = next(iter(PairBatches(cfg, collate_groups, 0, 1, SkipCounter("t"))))
    reference = {p.group: p.negative for p in iter_caption_pairs(
        str(path), SkipCounter("r"), seed=cfg.train.seed, negative_mode="random")}
    assert [p.negative for p in batch["pairs"]] == [reference[g] for g in batch["groups"]]
    cfg.train.stage = "llm2clip_cc"
    cfg.stage1.negative_mode = "nearest"
    with pytest.raises(ConfigError, match="stage1.negative_mode: 'nearest' must be mined or random"):
        validate(cfg, 1)


# ------------------------------------------------------------------------------------------ MNTP as its own LoRA

REPO = Path(__file__).resolve().parents[1]
TP = 2


def _hand_delta(mntp: dict, module: str, tp_rank: int, groups_local: int, hidden: int,
                scaling: float) -> torch.Tensor:
    """``scaling * B A`` of the MNTP LoRA for this TP rank's shard of one linear, from the full matrices, laid out
    as megatron shards it: qkv per local query group [q, k, v]; fc1 [gate; up]; proj/fc2 split over input columns."""
    def local_b(target: str) -> torch.Tensor:
        return mntp[f"{module}.lora.B.{target}"].chunk(TP)[tp_rank]

    def a(target: str) -> torch.Tensor:
        return mntp[f"{module}.lora.A.{target}"]

    if module.endswith("linear_qkv"):
        parts = [(local_b(t) @ a(t)).view(groups_local, -1, hidden) for t in ("q", "k", "v")]
        return scaling * torch.cat(parts, dim=1).reshape(-1, hidden)
    if module.endswith("linear_fc1"):
        return scaling * torch.cat([local_b("gate") @ a("gate"), local_b("up") @ a("up")])
    target = "o" if module.endswith("linear_proj") else "down"
    return scaling * (mntp[f"{module}.lora.B.{target}"] @ a(target).chunk(TP, dim=1)[tp_rank])


def _mntp_worker(overrides: list[str]) -> dict:
    from megatron.core import parallel_state

    from llm2clip_scale.checkpoint.layout import ADAPTER_CONFIG_FILE, LORA_FILE
    from llm2clip_scale.checkpoint.lora import load_global_lora_state
    from llm2clip_scale.config import load_config
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.lora import apply_lora, lora_adapters
    from llm2clip_scale.models.llm.tower import build_text_tower
    from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask
    from llm2clip_scale.train.mntp import MNTP_LORA_FILE, merge_saved_mntp

    cfg = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", overrides)
    llm = cfg.model.llm
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_minutes)
    topo = build_topology(TP, 1)
    task = LLM2CLIPCaptionContrastiveTask()
    task.build(cfg, topo)
    tower = task.tower
    before = {n: p.detach().clone() for n, p in tower.named_parameters() if ".lora." not in n}
    out: dict = {"mntp": task.before_training()["mntp"]}
    mntp = task.mntp_state
    tp_rank, scaling = parallel_state.get_tensor_model_parallel_rank(), llm.lora_alpha / llm.lora_rank
    groups_local = llm.num_query_groups // TP
    errors, untouched = [], []
    for name, param in tower.named_parameters():
        if ".lora." in name:
            continue
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.split(".")[-1] in ("linear_qkv", "linear_proj", "linear_fc1",
                                                                   "linear_fc2"):
            expected = before[name] + _hand_delta(mntp, module, tp_rank, groups_local, llm.hidden_size, scaling)
            errors.append(float((param - expected).abs().max()))
        else:
            untouched.append(torch.equal(param, before[name]))
    out["merge_error"], out["others_untouched"], out["merged"] = max(errors), all(untouched), len(errors)
    out["delta_size"] = max(float(v.abs().max()) for k, v in mntp.items() if ".B." in k)
    adapters = lora_adapters(tower)
    out["simcse_b_zero"] = all(not b.any() for ad in adapters.values() for b in ad.B.values())
    out["fresh_optimizer"] = {id(p) for p in task.params} == {id(p) for ad in adapters.values()
                                                                for p in ad.parameters()}
    out["base_frozen"] = not any(p.requires_grad for n, p in tower.named_parameters() if ".lora." not in n)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    tower.eval()
    with torch.no_grad():
        at_step0 = tower(ids, mask, mask)
        # The resume path: the original base with the saved MNTP LoRA merged, no adapters at all.
        rebuilt = build_text_tower(llm, trainable=False)
        merge_saved_mntp(rebuilt, {k: v.clone() for k, v in mntp.items()}, llm)
        out["step0_error"] = float((at_step0 - rebuilt(ids, mask, mask)).abs().max())
        out["rebuilt_weights_equal"] = all(torch.equal(p, dict(tower.named_parameters())[n])
                                           for n, p in rebuilt.named_parameters())
        # After some SimCSE training (stand-in: random B), the checkpoint's lora.safetensors of rank 2r applied to the
        # original base reproduces the tower: what stage 2's lora_init and export merge.
        for ad in adapters.values():
            for b in ad.B.values():
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
        trained = tower(ids, mask, mask)
        shared = task.state().shared
        meta = json.loads(shared[ADAPTER_CONFIG_FILE])
        fresh = build_text_tower(llm, trainable=False)
        apply_lora(fresh, meta["lora_rank"], meta["lora_alpha"], 0.0, meta["lora_targets"])
        load_global_lora_state(fresh, shared[LORA_FILE])
        fresh.eval()
        out["combined_error"] = float((fresh(ids, mask, mask) - trained).abs().max())
        out["combined_rank"] = (meta["lora_rank"], meta["lora_alpha"])
        out["saved_mntp_is_state"] = shared[MNTP_LORA_FILE] is mntp
        # A resumed task merges the saved MNTP LoRA under its (restored) adapters.
        resumed = LLM2CLIPCaptionContrastiveTask()
        resumed.build(cfg, topo)
        resumed.load_state({MNTP_LORA_FILE: mntp}, None)
        out["resumed_weights_equal"] = all(torch.equal(p, dict(tower.named_parameters())[n])
                                           for n, p in resumed.tower.named_parameters() if ".lora." not in n)

    # Through the loop and the checkpoint files: a run resumed from its step-2 checkpoint ends as the whole run did.
    from llm2clip_scale.checkpoint.layout import CheckpointError
    from llm2clip_scale.train.loop import run

    ckpt = cfg.checkpoint.dir
    four_steps = [*overrides, "train.steps=4", "train.warmup_steps=1"]
    whole = run(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", [*four_steps, "checkpoint.interval=2"]),
                LLM2CLIPCaptionContrastiveTask())
    resumed_run = run(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", [
        *four_steps, f"train.resume={ckpt}/step2", f"checkpoint.dir={ckpt}-resumed"]), LLM2CLIPCaptionContrastiveTask())
    out["whole_loss"], out["resumed_loss"] = whole["final_loss"], resumed_run["final_loss"]
    out["step2_files"] = sorted(p.name for p in Path(ckpt, "step2").iterdir() if p.suffix == ".safetensors")
    # The LoRA scaling is in no tensor: resuming under another alpha is refused, not silently a different model.
    try:
        run(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", [
            *four_steps, f"train.resume={ckpt}/step2", f"checkpoint.dir={ckpt}-other", "model.llm.lora_alpha=8"]),
            LLM2CLIPCaptionContrastiveTask())
    except CheckpointError as err:
        out["other_alpha"] = str(err)
    return out


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl pair file of synthetic captions and the word-level tokenizer trained on them."""
    from llm2clip_scale.data.synthetic import make_sample, train_tokenizer

    out = tmp_path_factory.mktemp("mntp")
    metas = [json.loads(make_sample("train", i, 16, 0)["json"]) for i in range(128)]
    (out / "pairs.jsonl").write_text("".join(json.dumps({"query": m["short"], "positive": m["long"]}) + "\n"
                                             for m in metas))
    train_tokenizer([m["long"] for m in metas] + [m["short"] for m in metas], out / "tokenizer")
    return out


def test_mntp_is_its_own_lora_merged_exactly_before_a_fresh_simcse_lora(pair_data: Path, tmp_path: Path) -> None:
    overrides = [f"data.train_shards={pair_data}/pairs.jsonl", f"model.llm.tokenizer={pair_data}/tokenizer",
                 "stage1.eval_pairs=null", "stage1.mntp_steps=2", "stage1.mntp_lr=1.0e-2", "train.global_batch=16",
                 "data.max_text_len=48", f"parallel.tensor_parallel={TP}", f"checkpoint.dir={tmp_path}/ckpt",
                 f"logging.dir={tmp_path}/logs"]
    results = run_on_ranks(_mntp_worker, TP, overrides)
    for result in results:  # each TP rank checks its own shard
        assert result["merged"] == 2 * 4  # 2 layers x qkv, proj, fc1, fc2
        assert result["delta_size"] > 1e-3  # MNTP did move its LoRA (so the merge is not a no-op)
        assert result["merge_error"] < 1e-6, result
        assert result["others_untouched"] and result["base_frozen"], result
        assert result["simcse_b_zero"] and result["fresh_optimizer"], result
        assert result["step0_error"] < 1e-6 and result["rebuilt_weights_equal"], result
        assert result["combined_rank"] == (32, 64.0) and result["combined_error"] < 1e-5, result
        assert result["saved_mntp_is_state"] and result["resumed_weights_equal"], result
    assert results[0]["mntp"] == results[1]["mntp"] and results[0]["mntp"]["steps"] == 2
    result = results[0]
    assert result["step2_files"] == ["lora.safetensors", "mntp_lora.safetensors"], result
    assert result["resumed_loss"] == pytest.approx(result["whole_loss"], abs=1e-6), result
    assert "model.llm.lora_alpha=8.0 but the checkpoint was trained with 32.0" in result.get("other_alpha", ""), result


def test_cra_queries_carry_no_instruction_unless_asked(tiny_data: Path) -> None:
    """LLM2CLIP's CRA protocol embeds caption 1 and caption 2 alike, without a prefix: by default the CRA queries are
    the captions' own token rows; eval_instruction=auto gives them the instruction training uses."""
    from llm2clip_scale.config import load_config
    from llm2clip_scale.data.prompts import instruction_for
    from llm2clip_scale.data.samples import load_tokenizer
    from llm2clip_scale.train.llm2clip_cc import cra_collator

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "llm2clip_cc_tiny.yaml",
                      [f"model.llm.tokenizer={tiny_data}/tokenizer"])
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    pairs = [CaptionPair("a red circle", "a large red circle in the middle", query_field="short",
                         positive_field="long")]
    plain = tokenize_captions(tok, ["a red circle"], cfg.model.llm.caption_format, "", cfg.data.max_text_len)
    batch = cra_collator(cfg, tok)(pairs)
    assert torch.equal(batch["query_input_ids"], plain[0]) and torch.equal(batch["query_pool_mask"], plain[2])
    cfg.stage1.eval_instruction = "auto"
    trained = tokenize_captions(tok, ["a red circle"], cfg.model.llm.caption_format, instruction_for("short", "long"),
                                cfg.data.max_text_len)
    batch = cra_collator(cfg, tok)(pairs)
    assert torch.equal(batch["query_input_ids"], trained[0]) and not torch.equal(trained[0], plain[0])
