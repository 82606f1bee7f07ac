"""Stage-1 building blocks: instruction tokenisation, distributed SimCSE, CRA, and caption-pair data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llm2clip_scale.data.pairs import (
    CaptionPair,
    PairCollator,
    attach_hard_negatives,
    batch_pairs,
    iter_caption_pairs,
    read_pair_file,
)
from llm2clip_scale.data.prompts import (
    DEFAULT_INSTRUCTION,
    SAME_KIND,
    TO_BRIEF,
    TO_DETAILED,
    instruction_for,
    tokenize_captions,
)
from llm2clip_scale.data.samples import load_tokenizer
from llm2clip_scale.data.shards import SkipCounter
from llm2clip_scale.data.synthetic import make_sample, train_tokenizer
from llm2clip_scale.eval.cra import caption_retrieval_accuracy
from llm2clip_scale.losses.simcse import simcse_loss
from tests.multiprocess import run_on_ranks

# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The synthetic set's word-level tokenizer ([BOS] caption [EOS]); instruction words it lacks become [UNK]."""
    out = tmp_path_factory.mktemp("tokenizer")
    captions = [json.loads(make_sample("train", i, 16, 0)["json"])["long"] for i in range(20)]
    train_tokenizer(captions, out)
    return load_tokenizer(str(out))


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT/Llama-3-style byte-level BPE, where a word's leading space is part of its token ("Ġa")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["retrieve: a dog on a mat", "a cat on the mat"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---------------------------------------------------------------------------------------------------------- prompts


def test_pool_mask_excludes_exactly_the_instruction_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    instruction = "Given a caption, retrieve: "
    captions = ["a small red circle", "a picture of two shapes on a white background.", "blue"]
    ids, mask, pool = tokenize_captions(tokenizer, captions, "plain", [instruction, "", instruction], max_len=64)
    assert ids.dtype == mask.dtype == pool.dtype == torch.long
    instruction_len = len(tokenizer(instruction, add_special_tokens=False)["input_ids"])
    for row, caption in enumerate(captions):
        plain = tokenizer(caption)["input_ids"]  # [BOS] caption [EOS]
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        pooled = ids[row][pool[row].bool()].tolist()
        assert pooled == plain  # exactly BOS, the caption's tokens and EOS are averaged
        excluded = int((mask[row] - pool[row]).sum())
        assert excluded == (0 if row == 1 else instruction_len)
        if row != 1:  # the instruction sits between BOS and the caption
            assert pool[row, 1 : 1 + instruction_len].sum() == 0 and pool[row, 0] == 1
    assert torch.equal(pool[1], mask[1])  # no instruction: pool over the attention mask, as stage 2 does


def test_pool_mask_counts_a_boundary_merged_token_as_caption() -> None:
    bpe = _byte_level_bpe()
    ids, _, pool = tokenize_captions(bpe, ["a dog on a mat"], "plain", "retrieve: ", max_len=64)
    tokens = bpe.convert_ids_to_tokens(ids[0].tolist())
    assert tokens == ["<s>", "retrieve", ":", "Ġa", "Ġdog", "Ġon", "Ġa", "Ġmat", "</s>"]
    # "Ġa" carries the instruction's trailing space but is the caption's first word.
    assert pool[0].tolist() == [1, 0, 0, 1, 1, 1, 1, 1, 1]


def test_truncation_caps_at_512_and_refuses_an_instruction_only_row(tokenizer: PreTrainedTokenizerBase) -> None:
    long_caption = " ".join(["a small red circle"] * 200)  # 800 words
    ids, mask, pool = tokenize_captions(tokenizer, [long_caption, "blue"], "plain", "retrieve : ", max_len=4096)
    assert ids.shape[1] == 512 and mask[0].sum() == 512 and pool[0].sum() == 512 - 2
    _, short_mask, _ = tokenize_captions(tokenizer, ["a red circle"], "plain", "", max_len=4)
    assert short_mask.shape == (1, 4)
    with pytest.raises(ValueError, match="no caption token"):
        tokenize_captions(tokenizer, ["a red circle"], "plain", "one two three four five : ", max_len=6)


def _llama3_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama-3's special tokens; like Llama-3 it prepends <|begin_of_text|> and appends nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Given a caption, retrieve a detailed caption: a dog on a mat", "a cat on the mat",
                             "user"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>")


def _llm2vec_reference(tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[tuple[list, list]]:
    """(all real token ids, pooled token ids) per row by llm2vec's own rules (LLM2Vec.encode -> _convert_to_str ->
    prepare_for_tokenization for Meta-Llama-3-8B-Instruct -> tokenize, left padding, embed_mask = last n tokens)."""
    separator = "!@#$%^&*()"
    texts = [f"{instruction.strip()} {separator}{text}" if instruction else f"{separator}{text}"
             for instruction, text in pairs]
    texts = ["<|start_header_id|>user<|end_header_id|>\n\n" + t.strip() + "<|eot_id|>" for t in texts]
    tokenizer.padding_side = "left"
    try:
        original = tokenizer(["".join(t.split(separator)) for t in texts], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    rows = []
    for row, text in enumerate(texts):
        n = len(tokenizer([text.split(separator)[1]], add_special_tokens=False)["input_ids"][0])
        ids = original["input_ids"][row][original["attention_mask"][row].bool()].tolist()
        embed_mask = torch.zeros_like(original["attention_mask"][row])
        embed_mask[-n:] = 1
        rows.append((ids, original["input_ids"][row][embed_mask.bool()].tolist()))
    return rows


def test_llm2vec_format_pools_what_llm2vec_embed_mask_pools() -> None:
    tokenizer = _llama3_style_tokenizer()
    pairs = [("Given a caption, retrieve a detailed caption: ", "a dog on a mat"), ("", "a cat on the mat "),
             ("", "a dog"), ("retrieve", "a cat")]
    ids, mask, pool = tokenize_captions(tokenizer, [c for _, c in pairs], "llm2vec", [i for i, _ in pairs], 64)
    reference = _llm2vec_reference(tokenizer, pairs)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    header = tokenizer("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    for row, (ref_ids, ref_pooled) in enumerate(reference):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert ids[row, :length].tolist() == ref_ids
        pooled = ids[row][pool[row].bool()].tolist()
        assert pooled == ref_pooled
        # Spelled out: BOS and the chat header are never pooled, the caption and <|eot_id|> always are.
        assert ref_ids[0] == tokenizer.bos_token_id and ref_ids[1 : 1 + len(header)] == header
        assert pool[row, : 1 + len(header)].sum() == 0 and pooled[-1] == eot
    # Rows with an instruction pool fewer tokens than they attend to, beyond BOS and the header.
    assert int((mask[0] - pool[0]).sum()) > 1 + len(header) and int((mask[1] - pool[1]).sum()) == 1 + len(header)


def test_llm2vec_format_truncates_the_caption_never_the_end_of_turn() -> None:
    tokenizer = _llama3_style_tokenizer()
    ids, mask, pool = tokenize_captions(tokenizer, ["a dog on a mat " * 20], "llm2vec", "", max_len=16)
    assert ids.shape == (1, 16) and mask.all()
    assert ids[0, -1] == tokenizer.convert_tokens_to_ids("<|eot_id|>") and pool[0, -1] == 1
    with pytest.raises(ValueError, match="no caption token"):
        tokenize_captions(tokenizer, ["a dog"], "llm2vec", "Given a caption, retrieve a detailed caption:", 8)
    with pytest.raises(ValueError, match="caption_format=plain"):  # a tokenizer without Llama-3's chat tokens
        tokenize_captions(_byte_level_bpe(), ["a dog"], "llm2vec")


def test_instruction_direction() -> None:
    assert instruction_for("short", "long") == TO_DETAILED
    assert instruction_for("long", "raw") == TO_BRIEF
    assert instruction_for("short", "short") == SAME_KIND
    assert instruction_for(None, "long") == instruction_for("alt", "long") == DEFAULT_INSTRUCTION


# ----------------------------------------------------------------------------------------------------------- SimCSE

LOCAL, DIM, WORLD = 3, 8, 2


def _simcse_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # float64: at temperature 0.02 float32 logits carry ~1e-6 relative rounding, the size of the tolerance.
    queries = torch.randn(WORLD * LOCAL, DIM, generator=gen, dtype=torch.float64)
    positives = queries + 2.0 * torch.randn(WORLD * LOCAL, DIM, generator=gen, dtype=torch.float64)
    negatives = positives + 0.5 * torch.randn(WORLD * LOCAL, DIM, generator=gen, dtype=torch.float64)
    return queries, positives, negatives


def _simcse_reference(with_negatives: bool) -> tuple[float, list[torch.Tensor]]:
    tensors = [t.clone().requires_grad_(True) for t in _simcse_inputs()]
    q, p, n = tensors
    loss = simcse_loss(q, p, n if with_negatives else None)
    loss.backward()
    return loss.item(), [t.grad for t in tensors]


def _simcse_rank() -> dict[bool, tuple[float, list[torch.Tensor]]]:
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import init_distributed

    init_distributed("gloo")
    rank = dist.get_rank()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {}
    for with_negatives in (True, False):
        tensors = [t[rows].clone().requires_grad_(True) for t in _simcse_inputs()]
        q, p, n = tensors
        loss = simcse_loss(q, p, n if with_negatives else None)
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        # Data-parallel convention: the global loss is the mean of the local ones, its gradient the local one / world.
        grads = [None if t.grad is None else t.grad / WORLD for t in tensors]
        results[with_negatives] = ((mean / WORLD).item(), grads)
    return results


@pytest.fixture(scope="module")
def simcse_ranks() -> list[dict[bool, tuple[float, list[torch.Tensor]]]]:
    return run_on_ranks(_simcse_rank, WORLD)


@pytest.mark.parametrize("with_negatives", [True, False])
def test_simcse_over_two_ranks_equals_the_global_batch(with_negatives: bool, simcse_ranks: list[dict]) -> None:
    ref_loss, ref_grads = _simcse_reference(with_negatives)
    assert ref_loss > 0.1 and all(g.abs().sum() > 0 for g in ref_grads[: 3 if with_negatives else 2])
    for rank, results in enumerate(simcse_ranks):
        loss, grads = results[with_negatives]
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for grad, ref in zip(grads, ref_grads):
            if ref is None:  # the unused negatives of the in-batch-only loss
                assert grad is None
            else:
                torch.testing.assert_close(grad, ref[rows], rtol=1e-6, atol=1e-9)


def test_simcse_matches_its_definition() -> None:
    q, p, n = _simcse_inputs()
    qn, pn, nn_ = (F.normalize(t, dim=-1) for t in (q, p, n))
    logits = qn @ torch.cat([pn, nn_]).T / 0.02
    expected = F.cross_entropy(logits, torch.arange(q.shape[0]))
    assert simcse_loss(q, p, n).item() == pytest.approx(expected.item(), rel=1e-12)
    assert simcse_loss(q.float(), p.float(), n.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="one \\(b, d\\) shape"):
        simcse_loss(q, p[:2])


# -------------------------------------------------------------------------------------------------------------- CRA


def test_cra_on_constructed_embeddings() -> None:
    keys = torch.eye(6)
    queries = keys.clone()
    queries[1] = keys[2] + 0.1 * keys[1]  # retrieves key 2: wrong
    queries[4] = keys[0]  # retrieves key 0: wrong
    assert caption_retrieval_accuracy(queries, keys) == pytest.approx(4 / 6, abs=0)
    assert caption_retrieval_accuracy(queries, keys, chunk=4) == pytest.approx(4 / 6, abs=0)
    assert caption_retrieval_accuracy(3.0 * queries, 0.5 * keys) == pytest.approx(4 / 6, abs=0)  # cosine
    # A query whose key has a duplicate earns 1/2; a collapsed encoder scores chance, not 100%.
    tied = keys.clone()
    tied[3] = tied[5]
    assert caption_retrieval_accuracy(tied, tied) == pytest.approx(4 / 6 + 2 * 0.5 / 6, abs=1e-12)
    assert caption_retrieval_accuracy(torch.ones(5, 4), torch.ones(5, 4)) == pytest.approx(1 / 5, abs=1e-12)


# ------------------------------------------------------------------------------------------------------------ pairs


def _write_shard(path: Path, records: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for record in records:
            sink.write(record)


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], int]:
    """Two shards of synthetic samples with 5 bad ones mixed in; returns the paths and the number of good samples."""
    out = tmp_path_factory.mktemp("pair_shards")
    good = [make_sample("train", i, 16, 0) for i in range(14)]
    same = json.loads(good[0]["json"])
    same["long"] = same["short"]
    bad = [
        {"__key__": "bad-json", "json": b"{not json"},
        {"__key__": "list-json", "json": b"[1, 2]"},
        {"__key__": "no-json", "png": good[0]["png"]},
        {"__key__": "one-field", "json": json.dumps({"short": "a red circle", "long": "  "}).encode()},
        {"__key__": "same-text", "json": json.dumps(same).encode()},
    ]
    first = good[:6] + bad[:3] + good[6:8]
    second = bad[3:] + good[8:]
    paths = [out / "p-000000.tar", out / "p-000001.tar"]
    _write_shard(paths[0], first)
    _write_shard(paths[1], second)
    return paths, len(good)


def test_pairs_from_shards_skip_bad_samples_exactly(pair_shards: tuple[list[Path], int]) -> None:
    paths, good = pair_shards
    source = "::".join(str(p) for p in paths)
    skips = SkipCounter("test")
    pairs = list(iter_caption_pairs(source, skips, fields=("short", "long"), seed=3))
    assert skips.counts == {"bad_json": 2, "missing_caption": 3}
    assert len(pairs) == good and len({p.group for p in pairs}) == good
    metas = {s["__key__"]: json.loads(s["json"]) for s in (make_sample("train", i, 16, 0) for i in range(good))}
    directions = set()
    for pair in pairs:
        meta = metas[pair.group]
        assert {pair.query_field, pair.positive_field} == {"short", "long"}
        assert (pair.query, pair.positive) == (meta[pair.query_field], meta[pair.positive_field])
        directions.add(pair.query_field)
        # The hard negative is another image's caption, never this pair's own text.
        assert pair.negative is not None and pair.negative not in (meta["short"], meta["long"])
        assert any(pair.negative in (m["short"], m["long"]) for k, m in metas.items() if k != pair.group)
    assert directions == {"short", "long"}  # random direction per pair
    again = list(iter_caption_pairs(source, SkipCounter("again"), fields=("short", "long"), seed=3))
    assert again == pairs  # deterministic for a seed
    other = list(iter_caption_pairs(source, SkipCounter("other"), fields=("short", "long"), seed=4))
    assert [p.query_field for p in other] != [p.query_field for p in pairs]


def test_pairs_are_dealt_disjointly_over_ranks(pair_shards: tuple[list[Path], int]) -> None:
    paths, good = pair_shards
    source = "::".join(str(p) for p in paths)
    whole = list(iter_caption_pairs(source, SkipCounter("all"), hard_negatives=False, seed=1))
    shares = [list(iter_caption_pairs(source, SkipCounter(f"r{r}"), rank=r, world_size=3, hard_negatives=False,
                                      seed=1)) for r in range(3)]
    assert [len(s) for s in shares] == [5, 5, 4]
    assert sorted(p.group for s in shares for p in s) == sorted(p.group for p in whole)
    assert shares[1] == whole[1::3]
    fixed = list(iter_caption_pairs(source, SkipCounter("eval"), random_direction=False, hard_negatives=False))
    assert all(p.query_field == "short" and p.positive_field == "long" for p in fixed)


def test_pair_files_count_bad_rows_exactly(tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"query": "a red circle", "positive": "a large red circle in the center"}),
        "",  # blank lines are not rows
        "{broken",  # bad_json
        json.dumps(["query", "positive"]),  # bad_json: not an object
        json.dumps({"query": "a blue square"}),  # missing_caption: no positive
        json.dumps({"query": "  ", "positive": "x"}),  # missing_caption: empty query
        json.dumps({"query": "q", "positive": "p", "negative": 3}),  # missing_caption: negative not a string
        json.dumps({"query": "a green triangle", "positive": "a small green triangle", "negative": "a red square"}),
    ]
    jsonl.write_text("\n".join(lines) + "\n")
    skips = SkipCounter("jsonl")
    pairs = list(read_pair_file(jsonl, skips))
    assert skips.counts == {"bad_json": 2, "missing_caption": 3}
    assert [(p.query, p.negative) for p in pairs] == [("a red circle", None), ("a green triangle", "a red square")]

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "query,positive,negative\n"
        'a red circle,"a large red circle, centered",a blue square\n'
        "too,many,cells,here\n"  # bad_row
        "only one cell\n"  # bad_row
        ",a positive without query,\n"  # missing_caption
        "\n"
        "a cat,a small cat,\n"  # empty negative cell: no negative given
    )
    skips = SkipCounter("csv")
    pairs = list(read_pair_file(csv_path, skips))
    assert skips.counts == {"bad_row": 2, "missing_caption": 1}
    first_row = f"{csv_path}@{len(b'query,positive,negative') + 1}"  # a row's group: its line's byte offset
    assert pairs[0] == CaptionPair("a red circle", "a large red circle, centered", "a blue square", first_row)
    assert (pairs[1].query, pairs[1].negative) == ("a cat", None)

    missing = SkipCounter("missing")
    assert list(read_pair_file(tmp_path / "absent.jsonl", missing)) == [] and missing.counts == {"read_error": 1}
    # A source mixing files: the pair without a negative gets one mined from another row.
    mixed = list(iter_caption_pairs(f"{jsonl}::{csv_path}", SkipCounter("mixed")))
    assert len(mixed) == 4 and all(p.negative is not None for p in mixed)
    assert mixed[1].negative == "a red square"  # given negatives are kept


def test_hard_negatives_prefer_word_overlap_and_skip_lonely_pairs() -> None:
    pairs = [
        CaptionPair("q0", "a large red circle", group="img0"),
        CaptionPair("q1", "a large red square", group="img1"),
        CaptionPair("q2", "two blue triangles", group="img2"),
        CaptionPair("q0 again", "a large red circle", group="img3"),  # same text, other image: never a negative
    ]
    out = list(attach_hard_negatives(pairs, random.Random(0), SkipCounter("neg"), window=4))
    assert [p.negative for p in out[:2]] == ["a large red square", "a large red circle"]
    assert out[3].negative == "a large red square"  # its own text is banned even though img0 has it too
    # No word in common with any candidate: any caption of another image will do.
    assert out[2].negative in {"a large red circle", "a large red square", "q0", "q1", "q0 again"}
    lonely = SkipCounter("lonely")
    assert list(attach_hard_negatives(pairs[:1], random.Random(0), lonely)) == [] and lonely.counts == {
        "no_negative": 1
    }


def test_pair_collator_batches(tokenizer: PreTrainedTokenizerBase, pair_shards: tuple[list[Path], int]) -> None:
    paths, _ = pair_shards
    pairs = iter_caption_pairs("::".join(str(p) for p in paths), SkipCounter("c"), seed=0)
    batches = list(batch_pairs(pairs, PairCollator(tokenizer, max_len=64), batch_size=4, keep_partial=True))
    assert [b["query_input_ids"].shape[0] for b in batches] == [4, 4, 4, 2]
    for batch in batches:
        for side in ("query", "positive", "negative"):
            assert batch[f"{side}_input_ids"].shape == batch[f"{side}_pool_mask"].shape
        # Only queries carry an instruction; plain captions pool over their whole attention mask.
        assert (batch["query_pool_mask"] < batch["query_attention_mask"]).any(dim=1).all()
        assert torch.equal(batch["positive_pool_mask"], batch["positive_attention_mask"])
        assert torch.equal(batch["negative_pool_mask"], batch["negative_attention_mask"])
    plain = PairCollator(tokenizer, instruction="", max_len=64)([CaptionPair("a red circle", "a blue square")])
    assert torch.equal(plain["query_pool_mask"], plain["query_attention_mask"]) and "negative_input_ids" not in plain
