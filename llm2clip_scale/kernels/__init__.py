"""Fused kernels where present, torch references otherwise: see ``registry``; ``llm2clip-scale env`` reports, per
slot, the implementation training runs, where it runs and why."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

from llm2clip_scale.kernels.registry import (
    DISABLE_ENV,
    SLOTS,
    KernelChoice,
    build_layernorm,
    build_optimizer,
    build_rmsnorm,
    megatron_layer_spec_name,
    resolve,
    resolve_all,
)

__all__ = [
    "DISABLE_ENV",
    "SLOTS",
    "KernelChoice",
    "build_layernorm",
    "build_optimizer",
    "build_rmsnorm",
    "environment",
    "format_environment",
    "megatron_layer_spec_name",
    "resolve",
    "resolve_all",
]

# Distribution names, read from package metadata so that reporting never imports (and initialises) the libraries.
PACKAGES = ("torch", "megatron-core", "deepspeed", "timm", "transformers", "webdataset", "apex", "transformer-engine",
            "flash-attn")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(force_reference: bool | None = None) -> dict[str, Any]:
    """Everything ``llm2clip-scale env`` prints, as plain data (``--json``)."""
    cuda = torch.cuda.is_available()
    device: dict[str, Any] = {"cuda_available": cuda, "torch_cuda_build": torch.version.cuda, "device_count": 0}
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        device.update(device_count=torch.cuda.device_count(), device_name=torch.cuda.get_device_name(0),
                      capability=f"{major}.{minor}", bf16_supported=torch.cuda.is_bf16_supported())
    return {
        "device": device,
        "versions": {dist: _version(dist) for dist in PACKAGES},
        # What parallel.backend=auto picks (distributed/topology.py).
        "distributed_backend": "nccl" if cuda else "gloo",
        "kernels": {slot: vars(choice) for slot, choice in resolve_all(force_reference).items()},
    }


def format_environment(env: dict[str, Any]) -> str:
    """A plain-text table of ``environment()``."""
    device = env["device"]
    lines = ["device"]
    if device["cuda_available"]:
        lines.append(f"  cuda                 {device['device_count']} x {device['device_name']} "
                     f"(capability {device['capability']}, bf16 {'yes' if device['bf16_supported'] else 'no'})")
    else:
        lines.append(f"  cuda                 no device (torch built with CUDA {device['torch_cuda_build'] or 'none'})")
    lines.append(f"  distributed          {env['distributed_backend']}")
    lines.append("versions")
    lines += [f"  {dist:<21}{version}" for dist, version in env["versions"].items()]
    lines.append("kernels (slot, implementation, fused or reference: why; then what training runs with it)")
    width = max(len(k["name"]) for k in env["kernels"].values())
    for slot, k in env["kernels"].items():
        lines.append(f"  {slot:<21}{k['name']:<{width}}  {'fused    ' if k['fused'] else 'reference'}  {k['reason']}")
        lines.append(f"  {'':<21}-> {k['runs']}")
    return "\n".join(lines)
