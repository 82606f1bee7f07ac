"""A GPU job never silently becomes a CPU job (distributed/backend.py), with CUDA's state faked both ways."""

from __future__ import annotations

import pytest
import torch

from llm2clip_scale.distributed.backend import BackendError, assigned_gpus, cuda_status, resolve_backend
from llm2clip_scale.distributed.topology import init_distributed

UNUSABLE = (False, "The NVIDIA driver on your system is too old (found version 11040)")
USABLE = (True, "")
SLURM_GPUS = {"SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "17"}


@pytest.mark.parametrize(("requested", "env", "status", "expected"), [
    ("auto", {}, UNUSABLE, "gloo"),  # a dev box: CPU on purpose
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}, UNUSABLE, "gloo"),
    ("auto", {"SLURM_GPUS_ON_NODE": "0"}, UNUSABLE, "gloo"),
    ("auto", SLURM_GPUS, USABLE, "nccl"),
    ("nccl", {}, USABLE, "nccl"),
    ("gloo", SLURM_GPUS, USABLE, "gloo"),  # a CPU run inside a GPU allocation, asked for by name
    ("gloo", SLURM_GPUS, UNUSABLE, "gloo"),
])
def test_backend_choice(requested: str, env: dict, status: tuple[bool, str], expected: str) -> None:
    assert resolve_backend(requested, env, status) == expected


@pytest.mark.parametrize("env", [SLURM_GPUS, {"SLURM_STEP_GPUS": "0,1"}, {"SLURM_JOB_GPUS": "3"},
                                 {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                                 # a single-GPU job: GPU id 0, not a count of zero
                                 {"CUDA_VISIBLE_DEVICES": "0"}, {"SLURM_JOB_GPUS": "0"}, {"SLURM_STEP_GPUS": "0"}])
def test_auto_on_assigned_gpus_without_cuda_stops(env: dict) -> None:
    with pytest.raises(BackendError) as err:
        resolve_backend("auto", env, UNUSABLE)
    message = str(err.value)
    assert assigned_gpus(env) in message  # which variable said GPUs were assigned
    assert "driver on your system is too old" in message  # why CUDA is unusable, in torch's words
    assert "parallel.backend: gloo" in message  # and the way to run on the CPU on purpose


def test_nccl_without_cuda_stops_even_off_slurm() -> None:
    with pytest.raises(BackendError, match=r"parallel.backend: nccl, but CUDA is unusable.*too old"):
        resolve_backend("nccl", {}, UNUSABLE)


def test_cuda_status_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    usable, why = cuda_status()
    assert not usable and "CPU-only build" in why

    def broken() -> bool:
        import warnings

        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old", stacklevel=1)
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert cuda_status() == (False, "CUDA initialization: The NVIDIA driver on your system is too old")


def test_init_distributed_refuses_before_any_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node without usable CUDA (this one; faked on a GPU runner): as a Slurm task assigned GPUs, ``auto`` must
    stop, not fall back to gloo."""
    import torch.distributed as dist

    from llm2clip_scale.distributed import backend

    monkeypatch.setattr(backend, "cuda_status", lambda: UNUSABLE)
    for name, value in {**SLURM_GPUS, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(name, value)
    # A port nobody listens on: were the check missing, init_process_group (world 1) would succeed here.
    monkeypatch.setenv("MASTER_PORT", "29517")
    with pytest.raises(BackendError, match="SLURM_GPUS_ON_NODE=8"):
        init_distributed("auto")
    assert not dist.is_initialized()


# ---------------------------------------------------------------------- collectives on the process group's device

COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "all_to_all_single"}
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange"}  # the *_like ones inherit a device


def _host_tensors_in_collectives(source: str) -> list[str]:
    """Collective arguments made by a torch factory without ``device=`` (directly or through a local name): under
    NCCL these are host tensors, which it rejects at the first call — a path the CPU suite cannot take."""
    import ast

    def is_factory(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords))

    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        hosts = {target.id for node in ast.walk(function) if isinstance(node, ast.Assign) and is_factory(node.value)
                 for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(function):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                for arg in node.args[:2]:
                    if is_factory(arg) or (isinstance(arg, ast.Name) and arg.id in hosts):
                        found.append(f"{function.name}:{node.lineno} dist.{node.func.attr}({ast.unparse(arg)})")
    return found


def test_every_collective_tensor_is_made_on_a_device() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for folder in ("llm2clip_scale", "data_prep", "tools") for p in sorted((root / folder).rglob("*.py"))]
    assert len(files) > 50
    found = {str(p.relative_to(root)): hits for p in files if (hits := _host_tensors_in_collectives(p.read_text()))}
    assert found == {}


def test_the_collective_check_finds_proclips_old_host_tensor() -> None:
    """The defect it guards: ProCLIP stage 1 all-reduced a float64 tensor made without a device."""
    old = (
        "def reduce_terms(values, group):\n"
        "    totals = torch.zeros(3, dtype=torch.float64)\n"
        "    totals += torch.tensor(values, dtype=torch.float64)\n"
        "    dist.all_reduce(totals, group=group)\n"
        "    ok = torch.zeros(3, dtype=torch.float64, device=values.device)\n"
        "    dist.all_reduce(ok, group=group)\n"
    )
    assert _host_tensors_in_collectives(old) == ["reduce_terms:4 dist.all_reduce(totals)"]
