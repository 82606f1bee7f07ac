"""HF Llama-family checkpoints in the megatron tower (TP/PP), and the pipeline-parallel tower and group embedding.

Tiny random HF models are saved with save_pretrained; transformers' own forward (fp32) is the reference. Spawning
ranks costs seconds, so each layout runs once (module fixtures) and computes everything the tests assert on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable

import pytest
import torch

from llm2clip_scale.config.schema import LLMConfig
from tests.multiprocess import run_on_ranks

VOCAB, HIDDEN, LAYERS = 128, 64, 4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Random-init tower for the PP layout tests (4 layers: 2 per stage at PP=2).
RAND_CFG = LLMConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=128, vocab_size=VOCAB, max_seq_len=32, seed=77)
TOL = 1e-5


def _captions(seed: int, lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random captions; pad positions hold random ids too, so a leak through the mask would show."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


MAIN_IDS, MAIN_MASK = _captions(0, [9, 4, 12, 1], 12)
# Per-rank captions of different counts and widths (one rank of four holds none).
RANK_CAPTIONS = [_captions(1, [5, 3, 2], 5), _captions(2, [9, 7], 11), _captions(3, [4], 6),
                 _captions(4, [], 3)]


# ------------------------------------------------------------------------------------------------ HF side (parent)


def _pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _hf_states(model: torch.nn.Module, bidirectional: bool) -> torch.Tensor:
    """Final-norm token states of transformers' forward; bidirectional = a 4D key-padding mask (no triangle)."""
    length = MAIN_IDS.shape[1]
    # transformers 5 uses a ready-made 4D mask as is (True = may attend), which removes the causal triangle.
    mask = MAIN_MASK.bool()[:, None, None, :].expand(-1, 1, length, length) if bidirectional else MAIN_MASK
    with torch.no_grad():
        return model(input_ids=MAIN_IDS, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Saved tiny checkpoints (Llama 3.2-style, sharded copy, encoder-layout copy, Qwen2, broken ones) + references."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1,
                  tie_word_embeddings=False)
    llama = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=131072,
                                         rope_parameters=LLAMA3_ROPE)).eval()
    llama.save_pretrained(root / "llama")
    llama.save_pretrained(root / "llama_sharded", max_shard_size="20KB")
    # LLM2CLIP's CC-finetuned release: a bare (bidirectional) Llama encoder, keys without the "model." prefix.
    llama.model.save_pretrained(root / "encoder")
    config = json.loads((root / "encoder" / "config.json").read_text())
    (root / "encoder" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaEncoderModel"]}))
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for name, param in qwen.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    qwen.eval().save_pretrained(root / "qwen")

    tensors = load_file(root / "llama" / "model.safetensors")
    for broken, edit in (("bad_shape", "reshape"), ("missing", "drop")):
        shutil.copytree(root / "llama", root / broken)
        changed = dict(tensors)
        if edit == "reshape":
            changed["model.layers.1.mlp.up_proj.weight"] = torch.zeros(120, HIDDEN)
        else:
            del changed["model.layers.2.mlp.down_proj.weight"], changed["model.norm.weight"]
        save_file(changed, root / broken / "model.safetensors", metadata={"format": "pt"})

    refs = {}
    for name, model in (("llama", llama.model), ("qwen", qwen.model)):
        for mode in ("causal", "bidir"):
            states = _hf_states(model, mode == "bidir")
            refs[f"{name}_{mode}_states"] = states
            refs[f"{name}_{mode}"] = _pool(states, MAIN_MASK)
    return {"dirs": {p.name: str(p) for p in root.iterdir()}, **refs}


# ------------------------------------------------------------------------------------------------- rank workers


def _tower(dirs: dict, name: str, bidirectional: bool) -> torch.nn.Module:
    from llm2clip_scale.models.llm.hf_import import llm_config_from_hf
    from llm2clip_scale.models.llm.tower import build_text_tower

    return build_text_tower(llm_config_from_hf(dirs[name], bidirectional=bidirectional, max_seq_len=32))


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _single_worker(dirs: dict) -> dict:
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.hf_import import SafetensorsSource, llm_config_from_hf, load_into_tower
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    build_topology(1, 1)
    out: dict = {"cfg": llm_config_from_hf(dirs["llama"]), "qwen_cfg": llm_config_from_hf(dirs["qwen"])}
    with torch.no_grad():
        for mode, bidir in (("causal", False), ("bidir", True)):
            tower = _tower(dirs, "llama", bidir)
            out[f"llama_{mode}"] = tower(MAIN_IDS, MAIN_MASK)
            out[f"llama_{mode}_states"] = tower(MAIN_IDS, MAIN_MASK, return_hidden_states=True)
        out["sharded_causal"] = _tower(dirs, "llama_sharded", False)(MAIN_IDS, MAIN_MASK)
        out["encoder_bidir"] = _tower(dirs, "encoder", True)(MAIN_IDS, MAIN_MASK)
        out["qwen_bidir"] = _tower(dirs, "qwen", True)(MAIN_IDS, MAIN_MASK)
        rand = build_text_tower(RAND_CFG)
        out["rand_main"] = rand(MAIN_IDS, MAIN_MASK)
        out["rand_per_rank"] = [rand(ids, mask) if ids.shape[0] else None for ids, mask in RANK_CAPTIONS]
    out["bad_shape"] = _error(lambda: _tower(dirs, "bad_shape", True))
    out["missing"] = _error(lambda: _tower(dirs, "missing", True))
    qwen_cfg = llm_config_from_hf(dirs["qwen"], max_seq_len=32)
    out["qwen_without_bias"] = _error(lambda: build_text_tower(dataclasses.replace(qwen_cfg, qkv_bias=False)))
    # Loading below the config check: checkpoint tensors the tower has no place for are refused, not dropped.
    with contextlib.ExitStack() as stack:
        no_bias = build_text_tower(dataclasses.replace(qwen_cfg, qkv_bias=False, hf_checkpoint=None))
        source = SafetensorsSource(dirs["qwen"], stack)
        out["qwen_unexpected"] = _error(lambda: load_into_tower(no_bias, source))
    # Tower config and checkpoint disagreeing on a field that shapes cannot reveal.
    llama_cfg = llm_config_from_hf(dirs["llama"], max_seq_len=32)
    out["wrong_theta"] = _error(lambda: build_text_tower(dataclasses.replace(llama_cfg, rotary_base=10000.0)))
    return out


def _tp2_worker(dirs: dict) -> dict:
    from llm2clip_scale.distributed.topology import build_topology, init_distributed

    init_distributed("gloo")
    build_topology(2, 1)
    out = {}
    with torch.no_grad():
        for mode, bidir in (("causal", False), ("bidir", True)):
            tower = _tower(dirs, "llama", bidir)
            out[f"llama_{mode}"] = tower(MAIN_IDS, MAIN_MASK)
            out[f"llama_{mode}_states"] = tower(MAIN_IDS, MAIN_MASK, return_hidden_states=True)
        out["qwen_causal"] = _tower(dirs, "qwen", False)(MAIN_IDS, MAIN_MASK)
        out["qwen_bidir"] = _tower(dirs, "qwen", True)(MAIN_IDS, MAIN_MASK)
    return out


def _pipeline_worker(dirs: dict, tp: int, pp: int) -> dict:
    """Every rank passes MAIN for the HF comparisons (the group embeds the union, each keeps its copy)."""
    from megatron.core import parallel_state

    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.embed import embed_local_batch
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    topo = build_topology(tp, pp)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out: dict = {"pp_rank": topo.pp_rank, "layers": None}
    for mode, bidir in (("causal", False), ("bidir", True)):
        if pp == 2 and tp == 2 and mode == "causal":
            continue  # the 4-rank run is the slowest; bidirectional suffices there
        tower = _tower(dirs, "llama", bidir)
        out[f"llama_{mode}"] = embed_local_batch(tower, MAIN_IDS, MAIN_MASK, tp_group)
    rand = build_text_tower(RAND_CFG)
    out["layers"] = [layer.layer_number for layer in rand.decoder.layers]
    out["rand_main"] = embed_local_batch(rand, MAIN_IDS, MAIN_MASK, tp_group, micro_batch_size=3)
    ids, mask = RANK_CAPTIONS[topo.rank]
    out["rand_own"] = embed_local_batch(rand, ids, mask, tp_group)
    return out


@pytest.fixture(scope="module")
def single(hf: dict) -> dict:
    return run_on_ranks(_single_worker, 1, hf["dirs"])[0]


@pytest.fixture(scope="module")
def tp2(hf: dict) -> list[dict]:
    return run_on_ranks(_tp2_worker, 2, hf["dirs"])


@pytest.fixture(scope="module")
def pp2(hf: dict) -> list[dict]:
    return run_on_ranks(_pipeline_worker, 2, hf["dirs"], 1, 2)


@pytest.fixture(scope="module")
def tp2pp2(hf: dict) -> list[dict]:
    return run_on_ranks(_pipeline_worker, 4, hf["dirs"], 2, 2)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max abs error {err} vs scale {expected.abs().max().item()}"


def _real_tokens(states: torch.Tensor) -> torch.Tensor:
    """Token states at non-pad positions only (pad queries are never pooled and differ between masking schemes)."""
    return states[MAIN_MASK.bool()]


# --------------------------------------------------------------------------------------------------------- tests


def test_config_from_hf(single: dict) -> None:
    cfg, qwen = single["cfg"], single["qwen_cfg"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (LAYERS, HIDDEN, 4, 2)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.rotary_base, cfg.norm_eps) == (128, VOCAB, 500000.0, 1e-5)
    assert cfg.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    assert not cfg.qkv_bias and qwen.qkv_bias and qwen.rotary_base == 1e6 and not qwen.rope_scaling
    assert cfg.max_seq_len == LLMConfig.max_seq_len and cfg.hf_checkpoint.endswith("llama")


@pytest.mark.parametrize("mode", ["causal", "bidir"])
def test_tp1_matches_transformers(hf: dict, single: dict, mode: str) -> None:
    _assert_rel_close(single[f"llama_{mode}"], hf[f"llama_{mode}"])
    _assert_rel_close(_real_tokens(single[f"llama_{mode}_states"]), _real_tokens(hf[f"llama_{mode}_states"]))
    # The modes must really differ, or the bidirectional comparison would prove nothing.
    assert (hf["llama_causal"] - hf["llama_bidir"]).abs().max() > 1e-2


def test_sharded_and_encoder_layouts_import_identically(hf: dict, single: dict) -> None:
    assert torch.equal(single["sharded_causal"], single["llama_causal"])
    assert torch.equal(single["encoder_bidir"], single["llama_bidir"])
    _assert_rel_close(single["qwen_bidir"], hf["qwen_bidir"])


@pytest.mark.parametrize("mode", ["causal", "bidir"])
def test_tp2_matches_transformers(hf: dict, tp2: list[dict], mode: str) -> None:
    for rank in tp2:
        _assert_rel_close(rank[f"llama_{mode}"], hf[f"llama_{mode}"])
        _assert_rel_close(_real_tokens(rank[f"llama_{mode}_states"]), _real_tokens(hf[f"llama_{mode}_states"]))
        _assert_rel_close(rank[f"qwen_{mode}"], hf[f"qwen_{mode}"])


@pytest.mark.parametrize("mode", ["causal", "bidir"])
def test_pp2_matches_transformers(hf: dict, pp2: list[dict], mode: str) -> None:
    assert [r["pp_rank"] for r in pp2] == [0, 1] and [r["layers"] for r in pp2] == [[1, 2], [3, 4]]
    for rank in pp2:
        _assert_rel_close(rank[f"llama_{mode}"], hf[f"llama_{mode}"])


def test_tp2pp2_matches_transformers(hf: dict, tp2pp2: list[dict]) -> None:
    for rank in tp2pp2:
        _assert_rel_close(rank["llama_bidir"], hf["llama_bidir"])


def test_pipeline_random_init_equals_single_stage(single: dict, pp2: list[dict], tp2pp2: list[dict]) -> None:
    for rank in pp2 + tp2pp2:
        _assert_rel_close(rank["rand_main"], single["rand_main"])


def test_pipeline_group_embedding_returns_each_ranks_own_captions(
    single: dict, pp2: list[dict], tp2pp2: list[dict]
) -> None:
    for results in (pp2, tp2pp2):
        for rank, result in enumerate(results):
            expected = single["rand_per_rank"][rank]
            if expected is None:  # a rank without captions gets an empty (0, hidden) block
                assert result["rand_own"].shape == (0, HIDDEN)
            else:
                _assert_rel_close(result["rand_own"], expected)


def test_wrong_shape_names_tensor_and_both_shapes(single: dict) -> None:
    message = single["bad_shape"]
    assert "model.layers.1.mlp.up_proj.weight" in message and "(128, 64)" in message and "(120, 64)" in message


def test_missing_tensors_are_listed(single: dict) -> None:
    message = single["missing"]
    assert "2 tensor(s)" in message
    assert "model.layers.2.mlp.down_proj.weight" in message and "model.norm.weight" in message


def test_config_mismatch_is_refused(single: dict) -> None:
    assert "qkv_bias" in single["qwen_without_bias"]
    assert "no place in the tower" in single["qwen_unexpected"]
    assert "model.layers.0.self_attn.q_proj.bias" in single["qwen_unexpected"]
    assert "rotary_base" in single["wrong_theta"]


def test_schedule_shim_is_inert_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.pipeline_parallel import schedules

    from llm2clip_scale.distributed import cpu_compat

    before = {name: getattr(schedules, name) for name in cpu_compat.PIPELINE_SCHEDULES}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_compat.enable_cpu_compat()
    assert {name: getattr(schedules, name) for name in cpu_compat.PIPELINE_SCHEDULES} == before
