"""Reading a run store: :class:`Run`, a read-only view sliced to the committed snapshots, and
:func:`committed_steps`, the reading side of the commit protocol.

Every read is checked: a chunk whose checksum fails, or that is missing where a committed
snapshot needs it, raises :class:`~spectra.store.format.StoreDamaged` naming the array, the
snapshot and the step; nothing damaged is ever returned as numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spectra.store import chunks
from spectra.store.format import (SERIES_CHUNK, UNCOMMITTED_STEP, MatrixSpec, StoreDamaged,
                                  StoreError, open_root, read_spec, unknown_param_message)
from spectra.store.location import Location, PathOrURL

Index = int | slice | Sequence[int] | np.ndarray


def committed_steps(root: zarr.Group) -> np.ndarray:
    """The steps of the committed snapshots, int64 (T,).

    Committed rows are the leading entries of ``steps`` that are not UNCOMMITTED_STEP. A
    ``steps`` chunk that is missing or damaged raises StoreDamaged instead of shortening the
    store: the count in attrs["spectra"]["committed"] (a lower bound written after each
    commit), committed entries after the gap, or, in schema-1 stores (grown one row per
    snapshot), an array more than one row longer than the prefix, all give it away.
    """
    array = root["steps"]
    values = chunks.read(array, slice(None), rows=range(0, array.shape[0], SERIES_CHUNK))
    gaps = np.flatnonzero(values == UNCOMMITTED_STEP)
    length = int(gaps[0]) if gaps.size else len(values)
    meta = root.attrs["spectra"]
    floor = int(meta.get("committed", 0))
    later = bool(np.any(values[length:] != UNCOMMITTED_STEP))
    grown_per_snapshot = meta["schema"] < 2 and len(values) - length > 1
    if length < floor or later or grown_per_snapshot:
        first = length // SERIES_CHUNK * SERIES_CHUNK
        if not chunks.chunk_exists(array, (length // SERIES_CHUNK,)):
            raise chunks.missing(array, first)
        raise StoreDamaged(f"{chunks.store_name(array)}: steps, snapshot {length}: reads as "
                           "never committed, but later snapshots are committed; run "
                           "`spectra verify` on the store", array="steps", snapshot=length,
                           step=None, reason="damaged")
    return values[:length].astype(np.int64)


def written_by_schema_2(meta: dict[str, Any]) -> bool:
    """True for stores created by a schema-2 writer: every chunk was written, W_0 included
    (schema 1 skipped chunks equal to the fill value, e.g. an all-zero W_0)."""
    return meta["schema"] >= 2 and "upgraded_from" not in meta


class Run:
    """Read-only view of a run store at a path or URL. Everything is sliced to the committed
    snapshots. A store that is still being written can be read; call :meth:`refresh` to see
    new snapshots.
    """

    def __init__(self, location: PathOrURL | Location):
        self.location = Location.of(location)
        self.path: Path | str = self.location.local or self.location.url
        self._open()
        meta = self._root.attrs["spectra"]
        self._checksummed = written_by_schema_2(meta)
        self.params: list[str] = list(meta["params"])
        self._specs = {name: read_spec(self._root, name) for name in self.params}
        self.refresh()

    def refresh(self) -> "Run":
        """Re-read the committed snapshots (for stores still being written). Returns self."""
        self._open()  # fresh root attributes and array metadata: the store may have grown
        self.attrs: dict[str, Any] = dict(self._root.attrs["spectra"])
        self.steps: np.ndarray = committed_steps(self._root)
        self._length = len(self.steps)
        self.time: np.ndarray = self._series("time")
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
        names = sorted(name for name, _ in self._root["scalars"].arrays())
        return {name: self._series(f"scalars/{name}") for name in names}

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
        array = self._array(name, "init")
        if self._checksummed:  # schema 1 stores did not write an all-zero W_0
            chunks.require_whole(array)
        return chunks.read(array, ...)

    def updates(self, name: str, index: Index = slice(None)) -> np.ndarray:
        """ΔW_t = W_t − W_0 at committed snapshot(s) ``index``: (m, n) for an int, else (k, m, n)."""
        self.spec(name)
        rows = _committed_rows(index, self._length, name)
        array = self._array(name, "updates")
        if isinstance(rows, slice):
            listed = list(range(*rows.indices(self._length)))
            values = chunks.read(array, rows, rows=listed, step_of=self._step_of)
        elif np.ndim(rows):
            listed = [int(r) for r in rows]
            values = chunks.read(array, rows, rows=listed, step_of=self._step_of, orthogonal=True)
        else:
            listed = [rows]
            values = chunks.read(array, rows, rows=listed, step_of=self._step_of)
        chunks.check_fill_rows(array, values.reshape(len(listed), -1), listed, self._step_of)
        return values

    def weights(self, name: str, index: Index = slice(None)) -> np.ndarray:
        """W_t = init + updates, in the dtype of ``init``; see the module docstring for its error."""
        init = self.init(name)
        return (init.astype(np.float64) + self.updates(name, index)).astype(init.dtype)

    def _open(self) -> None:
        self._root = open_root(self.location, mode="r")
        if "steps" not in self._root:
            raise StoreError(f"{self.location}: store creation was interrupted before it "
                             "completed; it holds no recorded data and can be deleted")

    def _series(self, name: str) -> np.ndarray:
        array = self._root[name]
        chunks.require_chunks(array, self._length)
        values = chunks.read(array, slice(0, self._length),
                             rows=range(0, self._length, SERIES_CHUNK))
        return np.asarray(values, dtype=np.float64)

    def _step_of(self, row: int) -> int | None:
        return int(self.steps[row]) if 0 <= row < self._length else None

    def _array(self, name: str, which: str) -> zarr.Array:
        key = f"params/{name}/{which}"
        if key not in self._arrays:
            self._arrays[key] = self._root[key]
        return self._arrays[key]


def open_run(location: PathOrURL | Location) -> Run:
    """Open a spectra run store (a path, or an fsspec URL such as ``memory://run.zarr`` or
    ``s3://bucket/run.zarr``) for reading. Raises FileNotFoundError or StoreError."""
    return Run(location)


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
