"""``--part I/N``: split a list (shards to build, to embed) into N contiguous slices, one per Slurm array task.

Shared by the data-prep CLIs so that every one parses ``I/N`` and cuts the same way. Stdlib only: a CLI's startup
(and each of its spawned workers) should not pay for torch just to parse an option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def parse_part(part: str) -> tuple[int, int]:
    """(I, N) of ``part`` = "I/N", with 0 <= I < N; ValueError (naming ``--part``) otherwise."""
    try:
        index, count = (int(value) for value in part.split("/"))
    except ValueError:
        raise ValueError(f"--part {part!r}: use I/N, e.g. 3/16") from None
    if not 0 <= index < count:
        raise ValueError(f"--part {part!r}: I must lie in 0..N-1")
    return index, count


def part_slice(items: Sequence[T], part: str) -> list[T]:
    """The I-th of N contiguous, near-equal slices of ``items`` (``part`` = "I/N"); the N slices cover all, once.

    Contiguous, not strided: a part of a shard build then reads one stretch of the manifests.
    """
    index, count = parse_part(part)
    return list(items[len(items) * index // count: len(items) * (index + 1) // count])
