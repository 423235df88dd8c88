"""Chunks of snapshots with their previous snapshot: the one iteration the analysis uses to walk
a run (extending the cache, comparing bases with the previous snapshot)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of a run, and ``first``: the row before ``start`` (the previous
    snapshot of the chunk's first row), or ``start`` itself at the run's first row."""

    start: int
    stop: int

    @property
    def first(self) -> int:
        return max(0, self.start - 1)

    @property
    def has_previous(self) -> bool:
        return self.start > 0

    def __len__(self) -> int:
        return self.stop - self.start


def chunks(start: int, stop: int, size: int) -> Iterator[Chunk]:
    """Consecutive chunks of at most ``size`` rows covering [start, stop)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    for begin in range(start, stop, size):
        yield Chunk(begin, min(stop, begin + size))
