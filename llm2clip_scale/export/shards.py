"""Sharded safetensors written as tensors stream in, named the way transformers names them.

The shard plan is made from the tensors' shapes before any weight is read (names and byte counts are known from
the config), so file names can carry the final count (``model-00001-of-00004.safetensors``) without renaming, and
each shard is written as soon as its last tensor arrives: peak memory is one shard plus the tensor in flight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of '2GB', '500MB', '64KiB' or a plain number (decimal units, as transformers' max_shard_size)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"shard size {text!r}: expected a number with an optional unit, e.g. 2GB, 500MB, 64KiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return size


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards in order; a shard is closed before it would exceed ``max_bytes`` (a tensor larger
    than that gets a shard of its own, as in transformers)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes:
        if shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return [shard for shard in shards if shard]


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_sharded(
    out_dir: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    max_bytes: int,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, str]:
    """Write the tensors named in ``specs`` (name, shape), in order, as shards of at most ``max_bytes``.

    ``produce(name)`` returns a tensor when its shard is being filled; it is cast to ``dtype`` and checked against
    the planned shape. ``on_tensor(name, tensor)`` sees every written tensor (fingerprints). Always writes the
    sharded form with its index (also for one shard), which transformers and llm2clip_scale's importer read alike.
    Returns the weight map {name: file}.
    """
    import torch  # here, not at the top: the CLI parses sizes before paying for torch
    from safetensors.torch import save_file

    item = torch.empty((), dtype=dtype).element_size()
    shapes = dict(specs)
    plan = plan_shards(((name, item * _numel(shape)) for name, shape in specs), max_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(plan):
        file_name = shard_file_name(index, len(plan))
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = produce(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, planned {tuple(shapes[name])}")
            if on_tensor is not None:
                on_tensor(name, tensor)
            tensors[name] = tensor
            weight_map[name] = file_name
            total += tensor.numel() * item
        # "format": "pt" is what transformers' loader expects in the header of a PyTorch safetensors file.
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    return weight_map


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
