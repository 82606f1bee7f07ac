"""This process's resident memory from Linux's /proc, for the tools that measure host memory (benchmarks, the first
GPU node's checks). torch has no CPU allocator statistics and tracemalloc does not see its allocations, so the
kernel's counters are the measure: VmRSS now, VmHWM the peak since start or since the last :func:`reset_peak`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path


def proc_status_kb() -> dict[str, int]:
    """Every ``kB`` field of /proc/self/status (VmRSS, VmHWM, RssAnon, …); empty where there is no /proc."""
    with contextlib.suppress(OSError):
        fields = (line.split() for line in Path("/proc/self/status").read_text().splitlines())
        return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) == 3 and f[2] == "kB"}
    return {}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (``5`` into clear_refs); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so the next measurement starts from a low RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
