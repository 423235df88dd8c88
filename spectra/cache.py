"""The analysis cache inside a run store: per-snapshot SVD results that analyze() reuses.

Layout (a zarr group beside the recorded data; deleting it only costs recomputation)::

    analysis/<target>/<param>/       attrs: {length, k}   ← written LAST: the commit
      sv         float64 (T, r)      all r = min(m, n) singular values, descending
      u          float64 (T, m, k)   top-k left singular vectors       (k > 0 only)
      vh         float64 (T, k, n)   top-k right singular vectors      (k > 0 only)
      stability  float64 (T,)        OIALR full-basis stability against the previous
                                     snapshot (NaN at t = 0)           (k > 0 only)

Rows ``< length`` are valid; longer arrays (a crash mid-update) are cut back on the next write.
A different ``k`` invalidates the entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

ARRAYS = ("sv", "u", "vh", "stability")
_DIMS = {"sv": ("snapshot", "index"), "u": ("snapshot", "row", "component"),
         "vh": ("snapshot", "component", "col"), "stability": ("snapshot",)}


class AnalysisCache:
    """Read and extend the cached SVD results of one store (opened for writing)."""

    def __init__(self, path: str | Path):
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        self._group = root.require_group("analysis")

    def entry(self, target: str, param: str, k: int) -> dict[str, np.ndarray]:
        """The valid cached rows for (target, param) computed with ``k``; {} if none."""
        group = self._find(target, param)
        if group is None or group.attrs.get("k") != k:
            return {}
        length = int(group.attrs.get("length", 0))
        return {name: array[:length] for name, array in group.arrays()}

    def length(self, target: str, param: str, k: int) -> int:
        group = self._find(target, param)
        if group is None or group.attrs.get("k") != k:
            return 0
        return int(group.attrs.get("length", 0))

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
                array = group.create_array(name, shape=(0, *values.shape[1:]), dtype=np.float64,
                                           chunks=(1, *values.shape[1:]), fill_value=np.nan,
                                           dimension_names=_DIMS[name])
            array.resize((start + count, *values.shape[1:]))
            array[start:start + count] = values
        group.attrs["length"] = start + count

    def _find(self, target: str, param: str) -> zarr.Group | None:
        try:
            return self._group[f"{target}/{param}"]
        except KeyError:
            return None
