"""The analysis cache inside a run store: per-snapshot SVD results that analyze() reuses.

Layout (a zarr group beside the recorded data; deleting it only costs recomputation)::

    analysis/<target>/<param>/       attrs: {length, k}   ← written LAST: the commit
      sv         float64 (T, r)      all r = min(m, n) singular values, descending
      u          float64 (T, m, k)   top-k left singular vectors       (k > 0 only)
      vh         float64 (T, k, n)   top-k right singular vectors      (k > 0 only)
      stability  float64 (T,)        OIALR full-basis stability against the previous
                                     snapshot (NaN at t = 0)           (k > 0 only)

Rows ``< length`` are valid; longer arrays (a crash mid-update) are cut back on the next write.
A different ``k`` invalidates the entry. Arrays are chunked by 32 snapshots, uncompressed: SVD
outputs in float64 barely compress, and an append then rewrites at most one partial chunk
(large, compressed chunks made writing the cache cost a quarter of analyze()'s time).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

_DIMS = {"sv": ("snapshot", "index"), "u": ("snapshot", "row", "component"),
         "vh": ("snapshot", "component", "col"), "stability": ("snapshot",)}
_CHUNK_ROWS = 32  # snapshots per chunk


class Entry:
    """The cached rows of one (target, param): ``length`` valid snapshots, read lazily."""

    def __init__(self, group: zarr.Group | None):
        self._arrays = dict(group.arrays()) if group is not None else {}
        self.length = int(group.attrs.get("length", 0)) if group is not None else 0

    def __bool__(self) -> bool:
        return self.length > 0

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (stop defaults to ``length``)."""
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.length} cached rows")
        return self._arrays[name][start:stop]


class AnalysisCache:
    """Read and extend the cached SVD results of one store (opened for writing)."""

    def __init__(self, path: str | Path):
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        self._group = root.require_group("analysis")

    def entry(self, target: str, param: str, k: int) -> Entry:
        """The cached rows for (target, param) computed with ``k`` (empty if none)."""
        group = self._find(target, param)
        return Entry(group if group is not None and group.attrs.get("k") == k else None)

    def append(self, target: str, param: str, k: int, start: int,
               rows: Mapping[str, np.ndarray]) -> None:
        """Write ``rows`` (name → (C, ...) arrays) at snapshot ``start``; then commit the length."""
        group = None if start == 0 else self._find(target, param)
        fresh = group is None or group.attrs.get("k") != k
        if fresh and start:
            raise ValueError(f"cannot append {target}/{param} at snapshot {start}: no cached "
                             f"rows before it with k={k}")
        if fresh:
            group = self._group.require_group(target).create_group(
                param, overwrite=True, attributes={"k": k, "length": 0})
        count = len(next(iter(rows.values())))
        for name, values in rows.items():
            shape = (start + count, *values.shape[1:])
            if fresh:
                array = group.create_array(name, shape=shape, dtype=np.float64,
                                           chunks=(_CHUNK_ROWS, *values.shape[1:]),
                                           fill_value=np.nan, compressors=None,
                                           dimension_names=_DIMS[name])
            else:
                array = group[name]
                array.resize(shape)
            array[start:start + count] = values
        group.attrs["length"] = start + count

    def _find(self, target: str, param: str) -> zarr.Group | None:
        try:
            return self._group[f"{target}/{param}"]
        except KeyError:
            return None
