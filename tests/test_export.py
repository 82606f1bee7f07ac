"""tools/convert_to_hf.py: tiny checkpoints of LLM2CLIP stage 1 and of stage 2 at TP=2, PP=2 and DP=2, exported and
verified by a separate process that reloads them with stock transformers and timm only (export/verify_export.py).

One spawned 2-rank job trains three 1-step stage-2 runs that merge the session's stage-1 checkpoint
(``tiny_stage1_checkpoint``) through ``model.llm.lora_init``: TP=2 with ZeRO-3; PP=2 with ZeRO-0, a vision LoRA,
SigLIP's bias and an LLM LoRA of its own; DP=2 with ZeRO-2. It then exports them on both ranks at once (each rank an
independent TP=1 exporter) and reruns the verifier on a tampered copy, while the stage-1 checkpoint goes through the
real command line in a fresh process alongside. Process start-up (imports) is most of the cost, so each kind is paid
once. Tolerances: 1e-5 relative for float32 exports (max |export - reference| / max |reference|), weights bit-exact;
the bfloat16 export is checked to be one rounding of the float32 one (its verifier tolerance, 3e-2, is for real
checkpoints: 5.8e-3 measured on the 500-step demo).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2clip_scale.config import load_config
from tests.conftest import stage1_overrides, tiny_overrides
from tests.multiprocess import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "convert_to_hf.py"
TOL = 1e-5
STAGE2_LAYOUTS = ("tp2", "pp2", "dp2")
DECODER = ("embed_tokens.", "layers.", "norm.")


def _stage2_overrides(data: Path, root: Path, stage1_ckpt: Path) -> dict[str, list[str]]:
    extra = {
        "tp2": ["parallel.tensor_parallel=2", "parallel.zero_stage=3"],
        # Everything else an export must fold in: a SigLIP tower (so a transformers copy is written too) with a
        # vision LoRA (trunk frozen), SigLIP's bias, and an LLM LoRA trained in stage 2 on top of the stage-1 one.
        "pp2": ["parallel.pipeline_parallel=2", "parallel.zero_stage=0",
                "model.vision.name=vit_base_patch16_siglip_224", "model.vision.lora_rank=4",
                "model.vision.lora_alpha=8.0", "train.loss=siglip", "model.logit_bias_init=-10.0",
                "model.llm.lora_rank=4", "model.llm.lora_alpha=8.0"],
        "dp2": ["parallel.zero_stage=2"],
    }
    return {name: [*tiny_overrides(data, root / name, 1), "data.eval_shards=null",
                   f"model.llm.lora_init={stage1_ckpt}", *more] for name, more in extra.items()}


TAMPERED = "layers.1.mlp.down_proj.weight"
# LoRA target -> (megatron linear holding it, HF module): the stage-1 test's own arithmetic, on layer 1.
QKV, FC1 = "self_attention.linear_qkv", "mlp.linear_fc1"
LORA_MODULES = {"q": (QKV, "self_attn.q_proj"), "v": (QKV, "self_attn.v_proj"), "gate": (FC1, "mlp.gate_proj"),
                "up": (FC1, "mlp.up_proj"), "o": ("self_attention.linear_proj", "self_attn.o_proj"),
                "down": ("mlp.linear_fc2", "mlp.down_proj")}
BASE_NAMES = [f"layers.1.{hf}.weight" for _, hf in LORA_MODULES.values()] + ["layers.1.input_layernorm.weight"]


def _tampered_verification(export: Path, reference: Path, copy: Path) -> dict:
    """Change one element of one weight in a copy of ``export``, run the verifier on it; what it reported."""
    from llm2clip_scale.export.convert import VerificationError, run_verifier

    shutil.copytree(export, copy)
    index = json.loads((copy / "text" / "model.safetensors.index.json").read_text())
    shard = copy / "text" / index["weight_map"][TAMPERED]
    tensors = load_file(str(shard))
    tensors[TAMPERED][3, 5] += 0.01
    save_file(tensors, str(shard), metadata={"format": "pt"})
    try:
        run_verifier(copy, torch.load(reference, weights_only=False))
    except VerificationError as err:
        return {"message": str(err), "report": err.report}
    return {"message": None, "report": None}


def _train_and_export(stage1: list[str], stage2: dict[str, list[str]], exports: list[tuple],
                      tamper: tuple[Path, Path, Path]) -> dict:
    import torch.distributed as dist

    from llm2clip_scale.distributed.topology import build_topology
    from llm2clip_scale.export.convert import export_checkpoint
    from llm2clip_scale.models.llm.hf_import import SeededSource
    from llm2clip_scale.train.stage2 import train_stage2

    results: dict = {}
    for name, overrides in stage2.items():  # each run's build_topology replaces the previous run's groups
        results[name] = train_stage2(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))
    build_topology(1, 1)  # collective; from here on every rank is an independent TP=1 / PP=1 exporter
    rank, world = dist.get_rank(), dist.get_world_size()
    results["exports"] = {name: export_checkpoint(checkpoint, out, **kwargs)
                          for index, (name, checkpoint, out, kwargs) in enumerate(exports) if index % world == rank}
    if rank == 0:
        # The failure case, rerun here while the other rank still exports; and the stage-1 run's base weights (its
        # seeded source, from its own config) for the test's own LoRA arithmetic.
        results["tampered"] = _tampered_verification(*tamper)
        base = SeededSource(load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", stage1).model.llm)
        results["base"] = {name: base.read(f"model.{name}") for name in BASE_NAMES}
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tiny_stage1_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("export_runs")
    stage1 = tiny_stage1_checkpoint
    out = root / "exports"
    # The stage-1 checkpoint through the real command line, in a fresh process, while the ranks train and export.
    cli = subprocess.Popen([sys.executable, str(CLI), str(stage1), str(out / "stage1"), "--shard-size", "200KB"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    exports = [(name, root / name / "ckpt", out / name, {}) for name in ("tp2", "pp2", "dp2")]
    exports[0][3]["keep_reference"] = root / "tp2_reference.pt"
    exports.append(("dp2_bf16", root / "dp2" / "ckpt", out / "dp2_bf16", {"dtype": "bfloat16", "verify": False}))
    tamper = (out / "tp2", root / "tp2_reference.pt", root / "tampered")
    try:
        ranks = run_on_ranks(_train_and_export, 2, stage1_overrides(tiny_data, stage1.parent, 3),
                             _stage2_overrides(tiny_data, root, stage1), exports, tamper, timeout=600)
    finally:
        stdout, stderr = cli.communicate(timeout=600)
    return {"root": root, "stage1": stage1, "out": out, "train": ranks[0],
            "records": {**ranks[0]["exports"], **ranks[1]["exports"]},
            "cli": {"returncode": cli.returncode, "stdout": stdout, "stderr": stderr}}


@pytest.fixture(scope="module")
def stage1_export(runs: dict) -> dict:
    """The stage-1 checkpoint exported by the command line, in small shards."""
    proc, out = runs["cli"], runs["out"] / "stage1"
    assert proc["returncode"] == 0, proc["stderr"][-3000:]
    assert len(proc["stdout"].strip().splitlines()) == 1  # stdout: the one JSON result line, progress on stderr
    return {"out": out, "summary": json.loads(proc["stdout"]),
            "record": json.loads((out / "export.json").read_text())}


def _text_weights(export: Path) -> dict[str, torch.Tensor]:
    index = json.loads((export / "text" / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(export / "text" / shard)))
    assert set(state) == set(index["weight_map"])
    return state


def _vision_weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export / "vision" / "model.safetensors"))


def _lora_delta(step_dir: Path, layer: int, target: str) -> torch.Tensor:
    """alpha / r * B @ A of one LoRA target, in fp64, straight from a checkpoint's raw files."""
    lora = load_file(str(step_dir / "lora.safetensors"))
    meta = json.loads((step_dir / "adapter_config.json").read_text())
    prefix = f"decoder.layers.{layer}.{LORA_MODULES[target][0]}.lora"
    return meta["lora_alpha"] / meta["lora_rank"] * (lora[f"{prefix}.B.{target}"].double()
                                                     @ lora[f"{prefix}.A.{target}"].double())


def _assert_verified(record: dict, tolerance: float) -> None:
    verification = record["verification"]
    assert verification["passed"] and verification["standalone"], verification
    assert verification["max_rel_error"] <= tolerance, verification
    assert verification["max_weight_error"] <= 1e-9, verification
    # The comparisons that must have happened: token rows, pooled embeddings, and the weights themselves.
    outputs = verification["outputs"]
    assert outputs["text[0] input_ids"] == 0.0 and outputs["text[1] with instruction pool_mask"] == 0.0
    assert "text[1] with instruction llm_embeddings" in outputs


# --------------------------------------------------------------------------------------------------- stage 2


def test_stage2_exports_of_every_layout_verify(runs: dict) -> None:
    layouts = {name: json.loads((runs["root"] / name / "ckpt" / "step1" / "manifest.json").read_text())["layout"]
               for name in STAGE2_LAYOUTS}
    assert (layouts["tp2"]["tensor_parallel"], layouts["pp2"]["pipeline_parallel"]) == (2, 2)
    assert layouts["dp2"]["llm_data_parallel"] == 2
    assert [layouts[n]["zero_stage"] for n in STAGE2_LAYOUTS] == [3, 0, 2]
    for name in STAGE2_LAYOUTS:
        record, export = runs["records"][name], runs["out"] / name
        _assert_verified(record, TOL)
        outputs = record["verification"]["outputs"]
        for key in ("text[0] text_features", "vision image_embeddings", "vision pixel_values "
                    "(preprocessor_config.json)", "logit_scale"):
            assert outputs[key] <= TOL, (name, key, outputs[key])
        for path in ("text/config.json", "text/modeling_llm2clip.py", "text/tokenizer.json", "vision/config.json",
                     "vision/model.safetensors", "preprocessor_config.json", "adapter.safetensors",
                     "clip_config.json", "README.md", "export.json"):
            assert (export / path).is_file(), (name, path)
        assert not (runs["out"] / f"{name}.partial").exists()
        config = json.loads((export / "text" / "config.json").read_text())
        assert config["auto_map"] == {"AutoModel": "modeling_llm2clip.LLM2CLIPLlamaEncoder"}
        assert config["llm2clip"]["bidirectional"] and config["llm2clip"]["caption_format"] == "plain"
        # The stage-1 LoRA (lora_init), and for pp2 the LLM LoRA it trained itself: (rank, merged weights).
        expected = [(16, 14)] + ([(4, 14)] if name == "pp2" else [])
        assert [(lora["rank"], lora["merged_weights"]) for lora in config["llm2clip"]["lora"]] == expected
        if name == "pp2":  # the SigLIP tower, reloaded as transformers' SiglipVisionModel + the head Linear
            assert record["vision_hf"]["architecture"] == "SiglipVisionModel"
            assert outputs["vision_hf image_embeddings"] <= TOL
            assert (export / "vision_hf" / "head.safetensors").is_file()
        else:  # vit_tiny has no transformers counterpart (no pre-norm): said, not silently dropped
            assert "skipped" in record["vision_hf"] and not (export / "vision_hf").exists()
    vision = json.loads((runs["out"] / "dp2" / "vision" / "config.json").read_text())
    assert vision["architecture"] == "vit_tiny_patch16_224" and vision["num_classes"] == 64
    assert vision["pretrained_cfg"]["input_size"] == [3, 32, 32] and vision["pretrained_cfg"]["crop_pct"] == 1.0


def test_trained_loras_and_siglip_bias_are_folded_in(runs: dict, stage1_export: dict) -> None:
    """The PP=2 run: its vision LoRA (ZeRO-0 module state) is merged into timm's linears, its logit bias exported,
    and its own LLM LoRA lands on top of the stage-1 one: decoder = stage-1 export + (alpha / r) * B @ A."""
    pp2 = runs["records"]["pp2"]
    assert pp2["vision"]["lora_merged_linears"] == 4  # qkv + proj of 2 blocks
    assert pp2["logit_bias"] == pytest.approx(-10.0, abs=0.05) and pp2["verification"]["outputs"]["logit_bias"] <= TOL
    step_dir = runs["root"] / "pp2" / "ckpt" / "step1"
    saved = torch.load(step_dir / "vision" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    lora_b = [value for key, value in saved.items() if key.endswith("lora_B")]  # zero before the step
    assert len(lora_b) == 4 and all(value.abs().max() > 1e-4 for value in lora_b)  # so a dropped merge would show
    assert not any("lora" in key or ".base." in key for key in _vision_weights(runs["out"] / "pp2"))

    meta = json.loads((step_dir / "adapter_config.json").read_text())
    assert meta["lora_rank"] == 4 and meta["base_lora_init"] == str(runs["stage1"])
    stage1, text = _text_weights(stage1_export["out"]), _text_weights(runs["out"] / "pp2")
    for layer in (0, 1):
        for target, (_, hf) in LORA_MODULES.items():
            before, delta = stage1[f"layers.{layer}.{hf}.weight"].double(), _lora_delta(step_dir, layer, target)
            assert delta.norm() > 1e-4 * before.norm(), (layer, target)
            torch.testing.assert_close(text[f"layers.{layer}.{hf}.weight"].double(), before + delta, rtol=0,
                                       atol=1e-7)


def test_layouts_and_stages_export_the_same_llm(runs: dict, stage1_export: dict) -> None:
    """The frozen LLM (base + stage-1 LoRA) is one model whatever layout trained stage 2: the TP=2 and DP=2 exports
    hold bit-identical decoder weights, identical to the stage-1 export's. What stage 2 trained (adapter, logit
    scale, vision tower) agrees between TP=2 / ZeRO-3 and DP=2 / ZeRO-2 to 1% of the one AdamW step they took.

    Why not 1e-5 relative: the layouts sum gradients in different orders, and Adam's first step moves each weight by
    lr * g / (|g| + eps), which turns a float-rounding difference dg of a gradient element near eps (1e-6) into a
    weight difference of up to lr * dg / (4 * eps) = 250 * dg. A handful of ~10^5 elements sit there: measured 1.4e-6
    and 1.7e-6 (0.14-0.17% of a step) on two machines, against weights of 0.08. (TP=2's losses equal TP=1's to 1e-5
    over 12 steps in test_train_stage2.py.)"""
    weights = {name: _text_weights(runs["out"] / name) for name in ("tp2", "dp2")}
    stage1 = _text_weights(stage1_export["out"])
    decoder = sorted(n for n in stage1 if n.startswith(DECODER))
    assert len(decoder) == 2 + 9 * 2 and set(stage1) == set(decoder)
    for name in ("tp2", "dp2"):
        for key in decoder:
            assert torch.equal(weights[name][key], stage1[key]), (name, key)
    trained = sorted(set(weights["dp2"]) - set(decoder))
    assert trained == sorted(set(weights["tp2"]) - set(decoder))
    assert trained and all(k.startswith(("adapter.", "logit_scale")) for k in trained)
    one_step = 1e-2 * load_config(REPO / "configs" / "tiny_cpu.yaml").optim.lr
    for key in trained:
        torch.testing.assert_close(weights["tp2"][key], weights["dp2"][key], rtol=0, atol=one_step)
    vision, reference = _vision_weights(runs["out"] / "tp2"), _vision_weights(runs["out"] / "dp2")
    assert set(vision) == set(reference)
    for key in vision:
        torch.testing.assert_close(vision[key], reference[key], rtol=0, atol=one_step)


def test_bfloat16_export_is_one_rounding_of_float32(runs: dict) -> None:
    record = runs["records"]["dp2_bf16"]
    assert record["dtype"] == "bfloat16" and record["verification"] is None  # --no-verify
    config = json.loads((runs["out"] / "dp2_bf16" / "text" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    full, half = _text_weights(runs["out"] / "dp2"), _text_weights(runs["out"] / "dp2_bf16")
    assert set(full) == set(half)
    for key, value in full.items():
        assert half[key].dtype == torch.bfloat16 and torch.equal(half[key], value.to(torch.bfloat16)), key
    vision = _vision_weights(runs["out"] / "dp2_bf16")
    for key, value in _vision_weights(runs["out"] / "dp2").items():
        assert torch.equal(vision[key], value.to(torch.bfloat16)), key


# --------------------------------------------------------------------------------------------------- stage 1


def test_stage1_export_merges_the_lora_exactly(runs: dict, stage1_export: dict) -> None:
    summary, record, out = stage1_export["summary"], stage1_export["record"], stage1_export["out"]
    assert summary["verified"] and summary["stage"] == "llm2clip_cc" and summary["vision"] is None
    _assert_verified(record, TOL)
    assert "text[0] text_features" not in record["verification"]["outputs"]  # stage 1 has no adapter
    assert record["text"]["shards"] > 2  # --shard-size 200KB
    assert not (out / "vision").exists() and not (out / "adapter.safetensors").exists()
    assert not (runs["out"] / "stage1.partial").exists()

    # Independently of the exporter: the base weight (the run's seeded source) + alpha / r * B @ A from the raw files.
    base, exported = runs["train"]["base"], _text_weights(out)
    for target, (_, hf) in LORA_MODULES.items():
        weight, delta = base[f"layers.1.{hf}.weight"].double(), _lora_delta(runs["stage1"] / "step3", 1, target)
        assert delta.norm() > 1e-3 * weight.norm(), target  # the step moved the LoRA: the merge is visible
        torch.testing.assert_close(exported[f"layers.1.{hf}.weight"].double(), weight + delta, rtol=0, atol=1e-7)
    name = "layers.1.input_layernorm.weight"  # untouched by LoRA: copied exactly
    assert torch.equal(exported[name], base[name])


def test_tampered_export_fails_verification_naming_the_tensor(runs: dict) -> None:
    """One element of one weight changed by 0.01 in a copy of the TP=2 export: the verifier (run by the converter's
    own path, in a fresh process) exits 1 naming that weight first, and the outputs it feeds fail too."""
    tampered = runs["train"]["tampered"]
    message, report = tampered["message"], tampered["report"]
    assert message is not None, "the verifier passed a tampered export"
    assert f"weight text/{TAMPERED}" in message and "exit status 1" in message, message
    assert not report["passed"] and report["worst"] == f"weight text/{TAMPERED}"
    assert report["errors"][f"weight text/{TAMPERED}"] > 1e-6
    assert any(not key.startswith("weight ") for key in report["failed"]), report["failed"]
    assert report["standalone"]


# ---------------------------------------------------------------------------------------------- input problems


def _main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    sys.path.insert(0, str(CLI.parent))
    try:
        import convert_to_hf
    finally:
        sys.path.pop(0)
    code = convert_to_hf.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_input_problems_exit_2_with_one_line(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, str(CLI), str(missing), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"convert_to_hf: error: {missing}: no such checkpoint; give a step directory " \
                                  "(…/step<N>) or a checkpoint root holding 'latest'"

    source = runs["root"] / "dp2" / "ckpt"

    def variant(name: str, part: str = "") -> Path:
        """A copy of the DP=2 checkpoint (root, or one step directory with ``part``) to break."""
        target = tmp_path / name / part if part else tmp_path / name
        shutil.copytree(source / part if part else source, target)
        return target

    copy, occupied = variant("ckpt"), tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    no_manifest = variant("half", "step1")
    (no_manifest / "manifest.json").unlink()
    unknown = variant("unknown", "step1")
    manifest = json.loads((unknown / "manifest.json").read_text())
    (unknown / "manifest.json").write_text(json.dumps({**manifest, "stage": "stage3"}))
    corrupt = variant("corrupt") / "step1" / "vision" / "mp_rank_00_model_states.pt"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    relinked = variant("relinked", "step1")  # as if the stage-1 LoRA file changed after stage 2 merged it
    manifest = json.loads((relinked / "manifest.json").read_text())
    assert manifest["lora_init"]["file"].endswith("lora.safetensors")  # the run pinned the step it merged
    manifest["lora_init"]["sha256"] = "0" * 64
    (relinked / "manifest.json").write_text(json.dumps(manifest))
    incomplete = variant("incomplete")
    (incomplete / "step1" / "vision" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()

    cases = [
        ([copy, occupied], "exists and is not empty; choose another OUT_DIR or pass --force"),
        ([no_manifest, tmp_path / "o1"], "no manifest.json; this save did not finish"),
        ([tmp_path / "half", tmp_path / "o2"], "no 'latest' and no manifest.json"),
        ([unknown, tmp_path / "o3"], "stage 'stage3' unknown"),
        ([tmp_path / "corrupt", tmp_path / "o4"], "mp_rank_00_model_states.pt: checksum differs from the manifest "
                                                  "(corrupt)"),
        ([incomplete, tmp_path / "o10"], "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"),
        ([copy, tmp_path / "o5", "--step", "9"], "--step 9:"),
        ([copy, tmp_path / "o6", "--set", "model.llm.tokenizer=/no/tokenizer"], "model.llm.tokenizer: /no/tokenizer"),
        ([copy, tmp_path / "o7", "--set", "model.llm.hf_checkpoint=/no/llm"], "model.llm.hf_checkpoint: /no/llm"),
        ([copy, tmp_path / "o8", "--set", "model.llm.lora_init=/no/lora"], "model.llm.lora_init: /no/lora"),
        ([copy, tmp_path / "o9", "--shard-size", "lots"], "--shard-size"),
        ([relinked, tmp_path / "o11"], "changed since this run merged it"),
    ]
    for argv, expected in cases:
        code, err = _main(argv, capsys)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert_to_hf: error: ") and expected in lines[0], (argv, err)
        assert not Path(str(argv[1]) + ".partial").exists()
    assert (occupied / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------- caption format, card


def test_exported_tokenizer_reproduces_both_caption_formats(tiny_data: Path) -> None:
    from llm2clip_scale.data.prompts import DEFAULT_INSTRUCTION, tokenize_captions
    from llm2clip_scale.data.samples import load_tokenizer
    from llm2clip_scale.export import modeling_llm2clip

    tokenizer = load_tokenizer(str(tiny_data / "tokenizer"))
    chat = load_tokenizer(str(tiny_data / "tokenizer"))
    chat.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                           "<|eot_id|>"]})
    captions = ["a red circle above a blue square .", "two small green triangles ", "black", ""]
    compared = refused = 0
    for fmt, tok in (("plain", tokenizer), ("llm2vec", chat)):
        for instructions in ("", DEFAULT_INSTRUCTION, ["", "left of", "", "top"]):
            for max_len in (512, 8):  # 8 truncates captions, or leaves no room for them after the instruction
                try:
                    expected = tokenize_captions(tok, captions, fmt, instructions, max_len)
                except ValueError:  # both sides refuse a row the instruction fills
                    with pytest.raises(ValueError):
                        modeling_llm2clip.tokenize_captions(tok, captions, fmt, instructions, max_len)
                    refused += 1
                    continue
                found = modeling_llm2clip.tokenize_captions(tok, captions, fmt, instructions, max_len)
                for key, value in zip(("input_ids", "attention_mask", "pool_mask"), expected):
                    assert torch.equal(found[key], value), (fmt, instructions, max_len, key)
                compared += 1
    assert compared >= 8 and refused >= 2, (compared, refused)


def test_modeling_file_encodes_bidirectionally_for_each_architecture(tiny_data: Path, tmp_path: Path) -> None:
    """The exported encoder class over Llama, Qwen2 (q/k/v biases) and Mistral: AutoModel with trust_remote_code
    reproduces the stock base model run with a 4-D key-padding mask and mean-pooled over the pooling mask (1e-6),
    under sdpa and eager attention; attention is really bidirectional; get_text_features is the adapter's."""
    from transformers import AutoConfig, AutoModel, LlamaModel, MistralModel, Qwen2Model

    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.data.samples import load_tokenizer
    from llm2clip_scale.export import modeling_llm2clip
    from llm2clip_scale.export.convert import MODELING_TEMPLATE
    from llm2clip_scale.export.text import hf_text_config

    tokenizer = load_tokenizer(str(tiny_data / "tokenizer"))
    adapter = {"input_dim": 32, "num_blocks": 1, "expansion": 2, "embed_dim": 16, "layernorm_eps": 1e-5}
    settings = {"bidirectional": True, "pooling": "mean", "caption_format": "plain", "max_length": 32,
                "adapter": adapter, "logit_scale": 2.5, "logit_scale_max": 4.6, "logit_bias": None}
    small = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                 vocab_size=64, max_seq_len=32, rotary_base=10000.0)
    mistral_base = tmp_path / "mistral_base"
    mistral_base.mkdir()
    (mistral_base / "config.json").write_text(json.dumps({"model_type": "mistral", "max_position_embeddings": 32}))
    captions = ["a red circle above a blue square .", "two small green triangles"]
    for arch, stock, llm in (("llama", LlamaModel, LLMConfig(**small)),
                             ("qwen2", Qwen2Model, LLMConfig(**small, qkv_bias=True)),
                             ("mistral", MistralModel, LLMConfig(**small, hf_checkpoint=str(mistral_base)))):
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_text_config(llm, tokenizer, torch.float32, settings)))
        shutil.copyfile(MODELING_TEMPLATE, folder / MODELING_TEMPLATE.name)
        torch.manual_seed(0)
        base = stock(AutoConfig.from_pretrained(folder)).eval()
        state = {name: value.normal_(0, 0.2) if name.endswith("bias") else value
                 for name, value in base.state_dict().items()}  # Qwen2's zero-initialised biases must matter
        adapter_state = modeling_llm2clip.LLM2CLIPAdapter(**adapter).state_dict()
        weights = {**state, "logit_scale": torch.tensor([2.5]),
                   **{f"adapter.{k}": 0.1 * torch.randn(v.shape) for k, v in adapter_state.items()}}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        eager = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                          attn_implementation="eager").eval()
        assert type(model).__name__ == {"llama": "LLM2CLIPLlamaEncoder", "qwen2": "LLM2CLIPQwen2Encoder",
                                        "mistral": "LLM2CLIPMistralEncoder"}[arch]
        batch = model.tokenize(captions, tokenizer, "Given a caption, ")  # 42-token vocabulary: ids < 64
        ids, mask, pool = batch["input_ids"], batch["attention_mask"], batch["pool_mask"]
        with torch.no_grad():
            keys = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # every query sees every real key
            states = base(input_ids=ids, attention_mask=keys).last_hidden_state
            expected = (states * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
            found = model(input_ids=ids, attention_mask=mask, pool_mask=pool)
            torch.testing.assert_close(found.pooler_output, expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(eager(input_ids=ids, attention_mask=mask, pool_mask=pool).pooler_output,
                                       expected, rtol=0, atol=1e-5)
            changed = ids.clone()
            changed[1, int(mask[1].sum()) - 2] = (changed[1, int(mask[1].sum()) - 2] + 1) % 64
            first = model(input_ids=changed, attention_mask=mask).last_hidden_state[1, 0]
            assert (first - found.last_hidden_state[1, 0]).abs().max() > 1e-4, arch  # a later token moved token 0
            features = model.get_text_features(ids, mask, pool)
            reference = model.adapter.proj(model.adapter.norm(model.adapter.blocks(
                torch.nn.functional.normalize(expected, dim=-1))))
            torch.testing.assert_close(features, torch.nn.functional.normalize(reference, dim=-1), rtol=0, atol=1e-6)
            assert float(model.scale()) == pytest.approx(float(torch.tensor(2.5).exp()))


def test_model_card_snippet_runs(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    export = runs["out"] / "dp2"
    card = (export / "README.md").read_text()
    assert "step 1" in card and "stage2" in card and "passed" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet.replace("OUT_DIR", str(export)), namespace)  # noqa: S102 - the card's own usage code
    probs = namespace["probs"]
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(), torch.tensor(1.0))
    features = namespace["text_features"]
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
