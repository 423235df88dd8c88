"""Reading a run store: :class:`Run`, a read-only view sliced to the committed snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spectra.store.format import (MatrixSpec, StoreError, committed_length, open_root,
                                  read_spec, unknown_param_message)

Index = int | slice | Sequence[int] | np.ndarray


class Run:
    """Read-only view of a run store. Everything is sliced to the committed snapshots.

    A store that is still being written can be read; call :meth:`refresh` to see new snapshots.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._root = open_root(self.path, mode="r")
        meta = self._root.attrs["spectra"]
        if "steps" not in self._root:
            raise StoreError(
                f"{self.path}: store creation was interrupted before its first snapshot "
                "(no 'steps' array); it holds no recorded data and can be deleted"
            )
        self.attrs: dict[str, Any] = dict(meta)
        self.params: list[str] = list(meta["params"])
        self._specs = {name: read_spec(self._root, name) for name in self.params}
        self.refresh()

    def refresh(self) -> "Run":
        """Re-read the committed length (for stores still being written). Returns self."""
        steps_array = self._root["steps"]  # fresh metadata: the store may have grown
        self._length = committed_length(steps_array)
        self.steps: np.ndarray = np.asarray(steps_array[: self._length], dtype=np.int64)
        self.time: np.ndarray = np.asarray(self._root["time"][: self._length], dtype=np.float64)
        self._arrays: dict[str, zarr.Array] = {}
        return self

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if len(self) else "no snapshots"
        return f"Run({str(self.path)!r}, {len(self.params)} matrices, {len(self)} snapshots, {span})"

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """Per-snapshot scalars, name → float64 (T,) (NaN where a snapshot had none)."""
        if "scalars" not in self._root:
            return {}
        group = self._root["scalars"]
        return {name: np.asarray(arr[: self._length], dtype=np.float64)
                for name, arr in sorted(group.arrays())}

    def spec(self, name: str) -> MatrixSpec:
        """The stored description of matrix ``name``."""
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(unknown_param_message(name, self.params)) from None

    def shape(self, name: str) -> tuple[int, int]:
        """(m, n) of the stored matrix."""
        return self.spec(name).shape

    def original_shape(self, name: str) -> tuple[int, ...]:
        """The parameter's shape in the model (e.g. a conv kernel's (out, in, kh, kw))."""
        return self.spec(name).original_shape

    def kind(self, name: str) -> str:
        """"linear", "conv", "embedding", "effective" or "matrix"."""
        return self.spec(name).kind

    def init(self, name: str) -> np.ndarray:
        """W_0 of matrix ``name``, (m, n)."""
        self.spec(name)
        return self._array(name, "init")[...]

    def updates(self, name: str, index: Index = slice(None)) -> np.ndarray:
        """ΔW_t = W_t − W_0 at committed snapshot(s) ``index``: (m, n) for an int, else (k, m, n)."""
        self.spec(name)
        rows = _committed_rows(index, self._length, name)
        array = self._array(name, "updates")
        if isinstance(rows, slice):
            return array[rows]
        return array.oindex[rows] if np.ndim(rows) else array[rows]

    def weights(self, name: str, index: Index = slice(None)) -> np.ndarray:
        """W_t = init + updates, in the dtype of ``init``; see the module docstring for its error."""
        init = self.init(name)
        return (init.astype(np.float64) + self.updates(name, index)).astype(init.dtype)

    def _array(self, name: str, which: str) -> zarr.Array:
        key = f"params/{name}/{which}"
        if key not in self._arrays:
            self._arrays[key] = self._root[key]
        return self._arrays[key]


def open_run(path: str | Path) -> Run:
    """Open a spectra run store for reading. Raises FileNotFoundError or StoreError."""
    return Run(path)


def _committed_rows(index: Index, length: int, name: str) -> slice | np.ndarray | int:
    """Translate ``index`` into rows of the committed range, raising IndexError outside it."""
    if isinstance(index, slice):
        return slice(*index.indices(length))
    rows = np.asarray(index)
    if rows.dtype.kind not in "iu":
        raise TypeError(f"snapshot index for {name!r} must be an int, a slice or ints; "
                        f"got {type(index).__name__}")
    if np.any(rows >= length) or np.any(rows < -length):
        raise IndexError(f"snapshot index {index} out of range for {name!r}: the store has "
                         f"{length} committed snapshots")
    rows = np.where(rows < 0, rows + length, rows)
    return rows if rows.ndim else int(rows)
