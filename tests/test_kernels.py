"""The kernel registry: selection with faked packages/devices, and that training runs what ``llm2clip-scale env``
reports — the vision tower's attention (timm's SDPA flag), the LLM tower's norms and layer spec — plus the factories,
the numerics tool and the report."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm2clip_scale import cli, kernels
from llm2clip_scale.kernels import registry
from tests.multiprocess import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("apex", "transformer_engine", "flash_attn")
CPU = torch.device("cpu")


def _numerics_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_fused_numerics", ROOT / "tools" / "check_fused_numerics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


tool = _numerics_tool()


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(registry.TIMM_FUSED_ATTN_ENV, raising=False)
    yield


def _fake(monkeypatch: pytest.MonkeyPatch, present: set[str], cuda: bool = True, capability: tuple[int, int] = (9, 0),
          flash_sdp: bool = True, efficient_sdp: bool = True) -> None:
    """Pretend ``present`` packages are installed (and the other optional ones absent) and a CUDA device exists."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        if name in present:
            return importlib.machinery.ModuleSpec(name, None)
        if name in OPTIONAL or name == "deepspeed":
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: flash_sdp)
    monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: efficient_sdp)


class FakeFusedRMSNorm(nn.RMSNorm):
    """Stands in for apex's FusedRMSNorm (same constructor) so that the wiring can be checked without apex."""


def _fake_apex_modules() -> dict[str, ModuleType]:
    apex, normalization = ModuleType("apex"), ModuleType("apex.normalization")
    normalization.FusedRMSNorm = FakeFusedRMSNorm
    apex.normalization = normalization
    return {"apex": apex, "apex.normalization": normalization}


# --- selection: a machine without CUDA (this one; faked on a GPU runner) -----------------------------------------


def test_cpu_machine_resolves_the_reference_except_timm_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choices = kernels.resolve_all()
    assert list(choices) == list(kernels.SLOTS)
    for slot, choice in choices.items():
        assert choice.slot == slot and choice.runs.startswith(registry.WHERE[slot])
        assert "no CUDA device" in choice.reason, choice
        if slot != "attention":
            assert not choice.fused and choice.name == registry.REFERENCE[slot], choice
    # timm's default on any device: F.scaled_dot_product_attention, which torch runs with its CPU flash kernel here.
    attention = choices["attention"]
    assert (attention.name, attention.fused) == ("sdpa", True)
    assert "flash-attention CPU kernel" in attention.reason and "F.scaled_dot_product_attention" in attention.runs
    assert kernels.megatron_layer_spec_name() == "local"
    assert "DotProductAttention" in choices["megatron_layer_spec"].runs


def test_forcing_the_reference_by_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "transformer_engine", "deepspeed"})
    assert all(choice.fused for choice in kernels.resolve_all().values())
    forced = kernels.resolve_all(force_reference=True)
    assert {slot: c.name for slot, c in forced.items()} == registry.REFERENCE
    assert all(not c.fused and c.reason == "reference forced by caller" for c in forced.values())

    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    choice = kernels.resolve("layernorm")
    assert (choice.name, choice.fused, choice.reason) == ("torch.nn.LayerNorm", False, "LLM2CLIP_DISABLE_FUSED=1 set")

    monkeypatch.setenv(kernels.DISABLE_ENV, "attention,adamw")  # a list pins only those slots
    choices = kernels.resolve_all()
    assert choices["attention"].name == "timm.explicit" and not choices["adamw"].fused
    assert choices["layernorm"].fused and choices["megatron_layer_spec"].fused


def test_timms_own_switch_is_honoured_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.TIMM_FUSED_ATTN_ENV, "0")
    choice = kernels.resolve("attention")
    assert (choice.name, choice.fused, choice.reason) == ("timm.explicit", False, "TIMM_FUSED_ATTN=0 set")
    monkeypatch.setenv(registry.TIMM_FUSED_ATTN_ENV, "2")  # timm's "experimental too": still SDPA
    assert kernels.resolve("attention").name == "sdpa"


def test_unknown_slot_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown kernel slot"):
        kernels.resolve("softmax")


# --- selection logic, with packages and devices faked ------------------------------------------------------------


def test_apex_and_cuda_pick_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "deepspeed"})
    choices = kernels.resolve_all()
    assert choices["layernorm"].name == "apex.FusedLayerNorm" and choices["layernorm"].fused
    assert choices["rmsnorm"].name == "apex.FusedRMSNorm"
    # AdamW is torch's fused kernel even with apex and DeepSpeed present: nothing to build or JIT-compile per rank.
    assert choices["adamw"].name == "torch.AdamW(fused)" and "Fake GPU" in choices["adamw"].reason
    assert choices["megatron_layer_spec"].name == "local"
    assert "transformer_engine not installed" in choices["megatron_layer_spec"].reason


def test_transformer_engine_picks_te_norms_and_the_te_layer_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"transformer_engine"})
    choices = kernels.resolve_all()
    assert choices["layernorm"].name == "te.LayerNorm"
    assert choices["rmsnorm"].name == "te.RMSNorm"
    assert kernels.megatron_layer_spec_name() == "transformer_engine"
    assert "TE DotProductAttention" in choices["megatron_layer_spec"].runs


def test_adamw_is_torch_fused_whatever_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"deepspeed"})
    assert kernels.resolve("adamw").name == "torch.AdamW(fused)"  # not DeepSpeed's JIT-built FusedAdam
    _fake(monkeypatch, set())
    choice = kernels.resolve("adamw")
    assert (choice.name, choice.fused) == ("torch.AdamW(fused)", True)
    layernorm = kernels.resolve("layernorm")
    assert not layernorm.fused and layernorm.reason == "apex, transformer_engine not installed"


def test_packages_without_cuda_give_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "transformer_engine", "flash_attn", "deepspeed"}, cuda=False)
    for slot, choice in kernels.resolve_all().items():
        assert choice.fused == (slot == "attention") and choice.reason.startswith("no CUDA device"), choice


@pytest.mark.parametrize(
    ("capability", "flash_sdp", "efficient_sdp", "fused", "reason"),
    [
        ((9, 0), True, True, True, "torch dispatches per call to flash (fp16/bf16), else mem-efficient, else math"),
        ((8, 6), False, True, True, "SDPA flash backend disabled in torch; torch dispatches per call to mem-efficient"),
        ((7, 0), True, True, True, "CUDA capability 7.0 < 8.0 required by flash attention; torch dispatches per "
                                   "call to mem-efficient, else math"),
        ((9, 0), False, False, False, "mem-efficient backend disabled in torch: torch's math kernel"),
    ],
)
def test_attention_reason_says_which_sdpa_kernel_torch_runs(monkeypatch: pytest.MonkeyPatch,
                                                            capability: tuple[int, int], flash_sdp: bool,
                                                            efficient_sdp: bool, fused: bool, reason: str) -> None:
    _fake(monkeypatch, {"flash_attn"}, capability=capability, flash_sdp=flash_sdp, efficient_sdp=efficient_sdp)
    choice = kernels.resolve("attention")
    assert (choice.name, choice.fused) == ("sdpa", fused)  # timm calls SDPA either way; flash_attn is never used
    assert reason in choice.reason


def test_detection_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: (_ for _ in ()).throw(ValueError()))
    for slot, choice in kernels.resolve_all().items():
        assert choice.fused == (slot == "attention")  # SDPA needs no probe: torch picks the CPU kernel
    assert "CUDA probe failed (driver exploded)" in kernels.resolve("adamw").reason


def test_factories_fall_back_when_a_found_package_is_unusable(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # find_spec says apex exists, but importing it fails (here: it is not really there): build, warn, don't raise.
    _fake(monkeypatch, {"apex", "transformer_engine"})
    monkeypatch.setitem(sys.modules, "apex", ModuleType("apex"))
    with caplog.at_level("WARNING", logger=registry.__name__):
        assert type(kernels.build_layernorm(8)) is nn.LayerNorm
        assert type(kernels.build_rmsnorm(8)) is nn.RMSNorm
    assert "apex.FusedLayerNorm unusable" in caplog.text and "apex.FusedRMSNorm unusable" in caplog.text
    # A fused AdamW choice with parameters on the CPU still gets the (CPU-capable) reference.
    optimizer = kernels.build_optimizer([nn.Parameter(torch.ones(3))], lr=0.1)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is not True


# --- the vision tower runs the reported attention ----------------------------------------------------------------


def _sdpa_calls(monkeypatch: pytest.MonkeyPatch, tower: nn.Module, image_size: int) -> int:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(F, "scaled_dot_product_attention", spy)  # timm calls it as F.scaled_dot_product_attention
        tower(torch.randn(2, 3, image_size, image_size))
    return len(calls)


@pytest.mark.parametrize("override", [None, (kernels.DISABLE_ENV, "attention"), (kernels.DISABLE_ENV, "1"),
                                      (registry.TIMM_FUSED_ATTN_ENV, "0")])
def test_vision_tower_runs_the_reported_attention(monkeypatch: pytest.MonkeyPatch,
                                                  override: tuple[str, str] | None) -> None:
    from timm.layers import use_fused_attn

    from llm2clip_scale.models.vision.timm_tower import attention_modules, build_vision_tower

    if override:
        monkeypatch.setenv(*override)
    sdpa = kernels.resolve("attention").name == "sdpa"
    assert sdpa == (override is None)
    timm_flag = use_fused_attn()
    for key in tool.TOWERS:  # ViT, EVA02 (RoPE), SigLIP (blocks + attention pool), built by build_vision_tower
        tower, image_size = tool.vision_tower(key, CPU, torch.float32)
        modules = attention_modules(tower)
        assert len(modules) >= 2 and set(modules.values()) == {sdpa}, (key, modules)
        assert _sdpa_calls(monkeypatch, tower, image_size) == (len(modules) if sdpa else 0), key
    name, _, kwargs = tool.TOWERS["so400m"]
    meta = build_vision_tower(tool.VisionConfig(name=name, image_size=56, timm_kwargs=kwargs), 8, device="meta")
    assert set(attention_modules(meta).values()) == {sdpa}  # the meta skeleton (pretrained loading) too
    assert use_fused_attn() == timm_flag  # timm's process-wide flag is left as it was


def test_the_reference_attention_build_computes_what_the_fused_build_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32, CPU: towers from the same seed, one built as training does (SDPA), one under LLM2CLIP_DISABLE_FUSED
    (timm's unfused path): equal weights, outputs and gradients within 1e-5 relative, from two different kernels."""
    from llm2clip_scale.models.vision.timm_tower import attention_modules

    for key in tool.TOWERS:
        fused, image_size = tool.vision_tower(key, CPU, torch.float32, seed=3)
        with monkeypatch.context() as env:
            env.setenv(kernels.DISABLE_ENV, "attention")
            reference, _ = tool.vision_tower(key, CPU, torch.float32, seed=3)
        assert all(attention_modules(fused).values()) and not any(attention_modules(reference).values())
        want = reference.state_dict()
        assert all(torch.equal(t, want[n]) for n, t in fused.state_dict().items())
        rows = tool.compare_tower_attention("sdpa", fused, reference, image_size, CPU, torch.float32)
        assert [r.quantity for r in rows] == ["forward", "backward d_images", "backward d_params"]
        assert all(r.max_rel <= 1e-5 for r in rows), rows
        assert any(r.max_abs > 0 for r in rows), "expected two different kernels, not one compared with itself"


# --- the LLM tower runs the reported norms and layer spec ---------------------------------------------------------


def test_llm_local_spec_norms_are_the_registry_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llm2clip_scale.models.llm import tower

    spec = tower._layer_spec("local", bidirectional=True)
    assert spec.submodules.input_layernorm is tower.RegistryRMSNorm
    assert spec.submodules.pre_mlp_layernorm is tower.RegistryRMSNorm
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, normalization="RMSNorm",
                               params_dtype=torch.bfloat16)

    def build() -> nn.Module:
        return build_module(spec.submodules.input_layernorm, config=config, hidden_size=32, eps=1e-5)

    assert kernels.resolve("rmsnorm").name == "torch.nn.RMSNorm"
    norm = build()
    assert type(norm) is nn.RMSNorm and norm.eps == 1e-5 and norm.weight.dtype == torch.bfloat16
    assert type(tool.llm_rmsnorm(32, torch.bfloat16)) is nn.RMSNorm  # the numerics tool builds the same

    _fake(monkeypatch, {"apex"})  # a GPU node with apex: the registry picks apex's fused RMSNorm, and so does the spec
    for name, module in _fake_apex_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    assert kernels.resolve("rmsnorm").name == "apex.FusedRMSNorm"
    norm = build()
    assert type(norm) is FakeFusedRMSNorm and norm.weight.dtype == torch.bfloat16
    assert type(tool.llm_rmsnorm(32, torch.bfloat16)) is FakeFusedRMSNorm


def _llm_tower_worker() -> dict:
    """Build the tiny stage-2 tower as training does (bf16, frozen); then again where the registry picks apex."""
    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.distributed.topology import build_topology, init_distributed
    from llm2clip_scale.models.llm.tower import build_text_tower

    init_distributed("gloo")
    build_topology(1, 1)
    cfg = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    vocab_size=128, max_seq_len=32, seed=1234)

    def facts(tower: nn.Module) -> dict:
        norms = {n: m for n, m in tower.named_modules() if n.endswith(("input_layernorm", "pre_mlp_layernorm",
                                                                        "final_layernorm"))}
        return {"layer_spec": tower.layer_spec, "norms": sorted({type(m).__name__ for m in norms.values()}),
                "norm_names": sorted(norms), "norm_dtypes": sorted({str(p.dtype) for m in norms.values()
                                                                    for p in m.parameters()}),
                "core_attention": sorted({type(m).__name__ for n, m in tower.named_modules()
                                          if n.endswith("core_attention")}),
                "rmsnorm": registry.resolve("rmsnorm").name, "spec": registry.resolve("megatron_layer_spec").name}

    out = {"cpu": facts(build_text_tower(cfg, params_dtype=torch.bfloat16))}
    sys.modules.update(_fake_apex_modules())
    registry._cuda = lambda: (True, "CUDA device Fake GPU")  # this process only (spawned)
    registry._present = lambda module: module == "apex"
    out["apex"] = facts(build_text_tower(cfg, params_dtype=torch.bfloat16))
    return out


def test_llm_tower_builds_the_reported_spec_and_norms() -> None:
    result = run_on_ranks(_llm_tower_worker, 1)[0]
    cpu, apex = result["cpu"], result["apex"]
    assert len(cpu["norm_names"]) == 5 and "decoder.final_layernorm" in cpu["norm_names"]  # 2 layers x 2 + final
    assert cpu["layer_spec"] == cpu["spec"] == "local" and cpu["core_attention"] == ["DotProductAttention"]
    assert cpu["rmsnorm"] == "torch.nn.RMSNorm" and cpu["norms"] == ["RMSNorm"]
    assert cpu["norm_dtypes"] == ["torch.bfloat16"]  # in the tower's dtype, as megatron's fused norms are
    # Every norm, the final one included (megatron would pick that one by what is installed), is the registry's.
    assert apex["rmsnorm"] == "apex.FusedRMSNorm" and apex["norms"] == ["FakeFusedRMSNorm"]
    assert apex["layer_spec"] == apex["spec"] == "local" and apex["norm_dtypes"] == ["torch.bfloat16"]


# --- the reference factories equal torch's own ---------------------------------------------------------------------


def test_build_layernorm_and_rmsnorm_match_torch() -> None:
    x = torch.randn(4, 7, 32)
    layernorm = kernels.build_layernorm(32, eps=1e-6)
    assert type(layernorm) is nn.LayerNorm and layernorm.eps == 1e-6
    nn.init.normal_(layernorm.weight)
    nn.init.normal_(layernorm.bias)
    expected = nn.LayerNorm(32, eps=1e-6)
    expected.load_state_dict(layernorm.state_dict())
    torch.testing.assert_close(layernorm(x), expected(x), rtol=0, atol=0)

    rmsnorm = kernels.build_rmsnorm(32, eps=1e-6)
    assert type(rmsnorm) is nn.RMSNorm
    nn.init.normal_(rmsnorm.weight)
    manual = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rmsnorm.weight
    torch.testing.assert_close(rmsnorm(x), manual, rtol=1e-6, atol=1e-6)


def test_build_optimizer_is_torch_adamw_and_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(3)]
    a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    groups = [{"params": iter([a]), "weight_decay": 0.05}]  # an iterator is fine: the factory lists it first
    optimizer = kernels.build_optimizer(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    expected = torch.optim.AdamW([{"params": [b], "weight_decay": 0.05}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.defaults["weight_decay"] == 0.1
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        optimizer.step()
        expected.step()
    assert not torch.equal(a.detach(), start)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-7)


# --- tooling: the numerics script and `llm2clip-scale env` ---------------------------------------------------------


def test_numerics_script_covers_every_slot_training_uses() -> None:
    assert set(tool.COMPARED) | {"megatron_layer_spec"} == set(kernels.SLOTS)  # that one: first_gpu_check te_vs_local


def test_numerics_script_runs_on_cpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Two of the vision families here (all four: the test above, and the tool itself); norms and AdamW are the
    # reference on a CPU, compared with themselves; the attention rows are a real SDPA-vs-unfused comparison.
    monkeypatch.setattr(tool, "TOWERS", {k: tool.TOWERS[k] for k in ("vit_tiny", "so400m")})
    assert tool.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "check_fused_numerics on cpu" in out and "28/28 passed" in out
    for slot in tool.COMPARED:
        assert f"\n{slot} " in out
    for key in ("vit_tiny", "so400m"):
        assert sum(line.startswith(f"attention  sdpa {key} ") for line in out.splitlines()) == 6  # 3 x fp32, bf16
    assert "reference here (compared with itself): layernorm, rmsnorm, adamw" in out


def test_numerics_script_flags_wrong_kernels(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # A "fused" LayerNorm with the wrong epsilon: the comparison must notice.
    rows = tool.compare_norm("layernorm", "wrong-eps", lambda: nn.LayerNorm(1024, eps=0.5),
                             lambda: nn.LayerNorm(1024, eps=1e-5), CPU, torch.float32, dim=1024)
    assert not rows[0].passed and rows[0].quantity == "forward"
    # A fused attention kernel that forgets the 1/sqrt(d) scale fails against timm's unfused path.
    tower, image_size = tool.vision_tower("vit_tiny", CPU, torch.float32)
    reference = tool.timm_reference(tower)
    real = F.scaled_dot_product_attention
    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **{**kw, "scale": 1.0}))
        bad = tool.compare_tower_attention("unscaled", copy.deepcopy(tower), reference, image_size, CPU, torch.float32)
    assert not any(r.passed for r in bad)
    # An AdamW without weight decay drifts from the reference trajectory.
    no_decay = lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)  # noqa: E731
    assert not tool.compare_adamw("x", no_decay, tool._adamw(True), CPU, torch.float32, steps=3)[0].passed
    # ... and main() exits non-zero on any FAIL.
    monkeypatch.setattr(tool, "run_checks", lambda *args, **kwargs: rows)
    assert tool.main([]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_numerics_script_follows_the_registry_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "attention")  # what training then runs is what the tool compares
    rows = tool.run_checks(CPU, kernels.resolve_all(), steps=2, towers=("vit_tiny",))
    attention = [r for r in rows if r.slot == "attention"]
    assert attention and all(r.impl == "timm.explicit vit_tiny (self-check)" and r.max_abs == 0 for r in attention)


def test_env_command_prints_every_slot(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU report, also on a GPU runner
    assert cli.main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for slot, choice in kernels.resolve_all().items():
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(slot))
        assert choice.name in lines[at] and choice.reason in lines[at]
        assert ("fused" if choice.fused else "reference") in lines[at]
        assert lines[at + 1].strip() == f"-> {choice.runs}"
    out = "\n".join(lines)
    for text in ("distributed          gloo", "megatron-core", "deepspeed", "timm", "transformers", "webdataset"):
        assert text in out

    assert cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["distributed_backend"] == "gloo" and report["device"]["cuda_available"] is False
    assert set(report["kernels"]) == set(kernels.SLOTS)
    assert report["kernels"]["attention"]["runs"] == kernels.resolve("attention").runs
    assert report["versions"]["torch"] == torch.__version__.split("+")[0]
