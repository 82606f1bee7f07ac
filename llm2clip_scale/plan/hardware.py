"""The GPU kinds ``llm2clip-scale plan`` knows: memory, dense peak (from metrics/flops.PEAK_TFLOPS) and link rates.

Memory is what ``nvidia-smi`` reports as the total of one GPU (MiB), not the marketing figure: an "80 GB" H100 has
81,559 MiB, an H200 ("141 GB") 143,771 MiB, a B200 ("192 GB") 183,359 MiB; of it the CUDA context, NCCL's and
cuBLAS's workspaces take ``RESERVED_BYTES`` before the first tensor (an assumption, measured as 1.5-3 GiB).

Link rates are ASSUMPTIONS, per GPU and per direction, the datasheet figures a collective cannot exceed: NVLink
within a node (A100: NVLink 3, 600 GB/s bidirectional = 300 one way; H100/H200: NVLink 4, 900 -> 450; B200:
NVLink 5, 1,800 -> 900) and InfiniBand between nodes with one NIC per GPU (A100 nodes: HDR 200 Gb/s = 25 GB/s;
H100/H200/B200 nodes: NDR 400 Gb/s = 50 GB/s). Real collectives reach ~70-85% of them, so the times derived from
these are lower bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm2clip_scale.metrics.flops import PEAK_TFLOPS

MIB = 2**20
GIB = 2**30
RESERVED_BYTES = 2 * GIB  # CUDA context + NCCL/cuBLAS workspaces: an assumption, see the module docstring


@dataclass(frozen=True)
class GPUKind:
    name: str
    memory_bytes: int
    peak_row: str  # row of flops.PEAK_TFLOPS
    nvlink_gbps: float  # GB/s per GPU per direction inside a node (assumption)
    network_gbps: float  # GB/s per GPU per direction between nodes (assumption)

    def peak_tflops(self, dtype: str) -> float:
        return PEAK_TFLOPS[self.peak_row][dtype]


GPUS: dict[str, GPUKind] = {
    "a100-40gb": GPUKind("a100-40gb", 40_960 * MIB, "A100", 300.0, 25.0),
    "a100-80gb": GPUKind("a100-80gb", 81_920 * MIB, "A100", 300.0, 25.0),
    "h100": GPUKind("h100", 81_559 * MIB, "H100 SXM", 450.0, 50.0),
    "h200": GPUKind("h200", 143_771 * MIB, "H200", 450.0, 50.0),
    "b200": GPUKind("b200", 183_359 * MIB, "B200", 900.0, 50.0),
}


def gpu_kind(name: str) -> GPUKind:
    """The table row for ``name`` (case-insensitive); ValueError listing the known kinds otherwise."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r} unknown; use one of {', '.join(GPUS)}")
    return GPUS[key]
