"""The kernel registry: reference path on CPU, selection logic with faked packages/devices, factories, tooling."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from llm2clip_scale import cli, kernels
from llm2clip_scale.kernels import registry

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("apex", "transformer_engine", "flash_attn")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    kernels.clear_cache()
    yield
    kernels.clear_cache()


def _fake(monkeypatch: pytest.MonkeyPatch, present: set[str], cuda: bool = True,
          capability: tuple[int, int] = (9, 0), flash_sdp: bool = True) -> None:
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
    monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: True)


# --- a machine without CUDA (this one; faked on a GPU runner): every slot is the reference, and says why ------------


def test_cpu_machine_resolves_every_slot_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choices = kernels.resolve_all()
    assert list(choices) == list(kernels.SLOTS)
    for slot, choice in choices.items():
        assert choice.slot == slot and not choice.fused
        assert choice.name == registry.REFERENCE[slot]
        assert "CUDA" in choice.reason or "not installed" in choice.reason, choice
    assert "no CUDA device" in choices["attention"].reason
    assert kernels.megatron_layer_spec_name() == "local"


def test_forcing_the_reference_by_argument_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "transformer_engine", "flash_attn", "deepspeed"})
    assert all(choice.fused for choice in kernels.resolve_all().values())
    forced = kernels.resolve_all(force_reference=True)
    assert not any(choice.fused for choice in forced.values())
    assert all(choice.reason == "reference forced by caller" for choice in forced.values())

    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    choice = kernels.resolve("layernorm")
    assert (choice.name, choice.fused, choice.reason) == ("torch.nn.LayerNorm", False, "LLM2CLIP_DISABLE_FUSED=1 set")

    monkeypatch.setenv(kernels.DISABLE_ENV, "attention,adamw")  # a list pins only those slots
    choices = kernels.resolve_all()
    assert not choices["attention"].fused and not choices["adamw"].fused
    assert choices["layernorm"].fused and choices["megatron_layer_spec"].fused


def test_unknown_slot_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown kernel slot"):
        kernels.resolve("softmax")


# --- selection logic, with packages and devices faked ------------------------------------------------------------


def test_apex_and_cuda_pick_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "deepspeed"})
    choices = kernels.resolve_all()
    assert choices["layernorm"].name == "apex.FusedLayerNorm" and choices["layernorm"].fused
    assert choices["rmsnorm"].name == "apex.FusedRMSNorm"
    assert choices["adamw"].name == "apex.FusedAdam"
    assert "apex installed" in choices["adamw"].reason and "Fake GPU" in choices["adamw"].reason
    assert choices["megatron_layer_spec"].name == "local"
    assert "transformer_engine not installed" in choices["megatron_layer_spec"].reason


def test_transformer_engine_picks_te_norms_and_the_te_layer_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"transformer_engine"})
    choices = kernels.resolve_all()
    assert choices["layernorm"].name == "te.LayerNorm"
    assert choices["rmsnorm"].name == "te.RMSNorm"
    assert kernels.megatron_layer_spec_name() == "transformer_engine"


def test_adamw_falls_through_deepspeed_then_torch_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"deepspeed"})
    assert kernels.resolve("adamw").name == "deepspeed.FusedAdam"
    _fake(monkeypatch, set())
    choice = kernels.resolve("adamw")
    assert (choice.name, choice.fused) == ("torch.AdamW(fused)", True)
    layernorm = kernels.resolve("layernorm")
    assert not layernorm.fused and layernorm.reason == "apex, transformer_engine not installed"


def test_packages_without_cuda_give_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {"apex", "transformer_engine", "flash_attn", "deepspeed"}, cuda=False)
    for choice in kernels.resolve_all().values():
        assert not choice.fused and choice.reason == "no CUDA device", choice


@pytest.mark.parametrize(
    ("present", "capability", "flash_sdp", "name", "reason"),
    [
        ({"flash_attn"}, (9, 0), True, "flash_attn", "flash_attn installed, CUDA capability 9.0"),
        (set(), (8, 0), True, "sdpa_flash", "flash_attn not installed"),
        (set(), (8, 6), False, "sdpa_efficient", "SDPA flash backend disabled"),
        ({"flash_attn"}, (7, 0), True, "sdpa_efficient", "CUDA capability 7.0 < 8.0 required by flash attention"),
    ],
)
def test_attention_selection(monkeypatch: pytest.MonkeyPatch, present: set[str], capability: tuple[int, int],
                             flash_sdp: bool, name: str, reason: str) -> None:
    _fake(monkeypatch, present, capability=capability, flash_sdp=flash_sdp)
    choice = kernels.resolve("attention")
    assert choice.name == name and choice.fused
    assert reason in choice.reason


def test_detection_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: (_ for _ in ()).throw(ValueError()))
    for choice in kernels.resolve_all().values():
        assert not choice.fused
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


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_explicit_softmax(masked: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(3))
    mask = None
    if masked:  # a key-padding mask: the last 4 keys of sample 1 are padding
        mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        mask[1, ..., 5:] = False
    out = kernels.attention(q, k, v, mask=mask)
    assert (out - _explicit_attention(q, k, v, mask)).abs().max() <= 1e-6
    if masked:  # padded keys really are ignored: changing their values changes nothing
        v2 = v.clone()
        v2[1, :, 5:] = 100.0
        assert (kernels.attention(q, k, v2, mask=mask)[1] - out[1]).abs().max() <= 1e-6


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


def _numerics_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_fused_numerics", ROOT / "tools" / "check_fused_numerics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_numerics_script_runs_the_cpu_self_check(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _numerics_tool()
    assert tool.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "fused path unavailable" in out and "FAIL" not in out
    for slot in tool.COMPARED:
        assert f"\n{slot} " in out
    assert out.count("PASS") == 32


def test_numerics_script_flags_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tool = _numerics_tool()
    cpu = torch.device("cpu")
    # A "fused" LayerNorm with the wrong epsilon: the comparison must notice.
    rows = tool.compare_norm("layernorm", "wrong-eps", lambda: nn.LayerNorm(1024, eps=0.5),
                             lambda: nn.LayerNorm(1024, eps=1e-5), cpu, torch.float32, dim=1024)
    assert not rows[0].passed and rows[0].quantity == "forward"
    # An attention that ignores the mask passes without one and fails with it.
    ignores_mask = lambda q, k, v, mask=None: kernels.attention(q, k, v)  # noqa: E731
    reference = lambda q, k, v, mask=None: kernels.attention(q, k, v, mask=mask, force_reference=True)  # noqa: E731
    assert all(r.passed for r in tool.compare_attention("x", ignores_mask, reference, cpu, torch.float32, False))
    assert not any(r.passed for r in tool.compare_attention("x", ignores_mask, reference, cpu, torch.float32, True))
    # An AdamW without weight decay drifts from the reference trajectory.
    no_decay = lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)  # noqa: E731
    assert not tool.compare_adamw("x", no_decay, tool._adamw(True), cpu, torch.float32, steps=3)[0].passed
    # ... and main() exits non-zero on any FAIL.
    monkeypatch.setattr(tool, "run_checks", lambda *args, **kwargs: rows)
    assert tool.main([]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_numerics_fused_branch_runs_with_sdpa_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # With CUDA faked, attention resolves to "sdpa_flash": on CPU that is torch's own dispatch (its CPU flash kernel),
    # so the fused-vs-reference branch of the script really compares two different kernels here.
    tool = _numerics_tool()
    real_resolve_all = tool.resolve_all
    with monkeypatch.context() as fake:  # a faked CUDA must not leak into torch's own optimizer/device code
        _fake(fake, set())
        faked = kernels.resolve_all()
        kernels.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)))  # caches the fused attention choice
    monkeypatch.setattr(tool, "resolve_all", lambda force_reference=None: real_resolve_all(True) if force_reference
                        else faked)
    rows = tool.run_checks(torch.device("cpu"), use_fused=True, steps=3)
    assert {r.slot for r in rows} == {"attention", "adamw"}  # the norms resolve to the reference: not compared
    attention_rows = [r for r in rows if r.slot == "attention"]
    assert all(r.impl == "sdpa_flash" and r.passed for r in attention_rows)
    assert any(r.max_abs > 0 for r in attention_rows), "expected two different kernels, not one compared with itself"


def test_env_command_prints_every_slot(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU report, also on a GPU runner
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for slot, choice in kernels.resolve_all().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(slot))
        assert choice.name in line and choice.reason in line and "reference" in line
    for text in ("distributed          gloo", "megatron-core", "deepspeed", "timm", "transformers", "webdataset"):
        assert text in out

    assert cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["distributed_backend"] == "gloo" and report["device"]["cuda_available"] is False
    assert set(report["kernels"]) == set(kernels.SLOTS)
    assert report["versions"]["torch"] == torch.__version__.split("+")[0]
