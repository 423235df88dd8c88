"""The analysis cache inside a run store: per-snapshot SVD results that analyze() reuses.

Layout (a zarr group beside the recorded data; deleting it only costs recomputation)::

    analysis/<target>/<param>/       attrs: {length, k}   ← written LAST: the commit
      sv         float64 (T, r)      all r = min(m, n) singular values, descending
      u          float64 (T, m, k)   top-k left singular vectors       (k > 0 only)
      vh         float64 (T, k, n)   top-k right singular vectors      (k > 0 only)
      stability  float64 (T,)        OIALR full-basis stability against the previous
                                     snapshot (NaN at t = 0)           (k > 0 only)

Rows ``< length`` are valid; longer arrays (a crash mid-update) are cut back on the next write.
A different ``k`` invalidates the entry. Arrays are chunked by as many snapshots as fit in 4 MB.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

_DIMS = {"sv": ("snapshot", "index"), "u": ("snapshot", "row", "component"),
         "vh": ("snapshot", "component", "col"), "stability": ("snapshot",)}
_CHUNK_BYTES = 4 * 2**20  # snapshots per chunk: as many as fit in 4 MB (1 to 1024)


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
        group = self._find(target, param)
        if group is None or group.attrs.get("k") != k or start == 0:
            group = self._group.require_group(target).create_group(param, overwrite=True)
            group.attrs.update({"k": k, "length": 0})
        count = len(next(iter(rows.values())))
        for name, values in rows.items():
            array = group.get(name)
            if array is None:
                row_bytes = max(1, values[0].nbytes)
                chunk = min(1024, max(1, _CHUNK_BYTES // row_bytes))
                array = group.create_array(name, shape=(0, *values.shape[1:]), dtype=np.float64,
                                           chunks=(chunk, *values.shape[1:]), fill_value=np.nan,
                                           dimension_names=_DIMS[name])
            array.resize((start + count, *values.shape[1:]))
            array[start:start + count] = values
        group.attrs["length"] = start + count

    def _find(self, target: str, param: str) -> zarr.Group | None:
        try:
            return self._group[f"{target}/{param}"]
        except KeyError:
            return None
