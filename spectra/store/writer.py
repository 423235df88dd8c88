"""Writing a run store: :class:`RunWriter`, the single writer, and the commit protocol."""

from __future__ import annotations

import datetime as _dt
import time as _time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spectra.store.format import (MATRIX_COMPRESSORS, SCHEMA_VERSION, UNCOMMITTED_STEP,
                                  UPDATE_DTYPES, MatrixSpec, StoreError, append_value,
                                  committed_length, open_root, read_spec, series_array,
                                  series_arrays)


class RunWriter:
    """The single writer of a run store; implements the commit protocol (module docstring).

    Create with :func:`create_run` or :func:`resume_run`; call :meth:`append` once per snapshot.
    """

    def __init__(self, root: zarr.Group):
        self._root = root
        meta = root.attrs["spectra"]
        self.path = Path(str(root.store_path.store.root))
        self.created: float = meta["created_unix"]
        self.params: list[str] = list(meta["params"])
        self._updates = {name: root[f"params/{name}/updates"] for name in self.params}
        self._init = {name: root[f"params/{name}/init"][...] for name in self.params}
        self._steps = root["steps"]
        self._time = root["time"]
        self._scalars = root.require_group("scalars")
        self.length = committed_length(self._steps)
        self.last_step: int | None = int(self._steps[self.length - 1]) if self.length else None

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of attrs["spectra"]."""
        return dict(self._root.attrs["spectra"])

    def update_meta(self, **fields: Any) -> None:
        """Merge JSON-serialisable ``fields`` into attrs["spectra"] (one atomic write)."""
        self._root.attrs["spectra"] = {**self.meta, **fields}

    def spec(self, name: str) -> MatrixSpec:
        return read_spec(self._root, name)

    def init(self, name: str) -> np.ndarray:
        """W_0 of ``name`` as stored, (m, n)."""
        return self._init[name]

    def last_weights(self, name: str) -> np.ndarray:
        """W_t of ``name`` at the last committed snapshot, float64 (m, n)."""
        if self.length == 0:
            raise StoreError(f"{self.path}: no committed snapshot yet")
        return self._init[name].astype(np.float64) + self._updates[name][self.length - 1]

    def append(self, step: int, weights: Mapping[str, np.ndarray],
               scalars: Mapping[str, float] | None = None, time: float | None = None) -> None:
        """Commit one snapshot: W_t of every recorded matrix (name → (m, n) array) at ``step``.

        ``time`` defaults to seconds since the store was created. Raises StoreError if ``step``
        does not increase or a matrix is missing or misshapen; nothing is committed then.
        """
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise StoreError(f"{self.path}: snapshot step {step} is not after the last committed "
                             f"step {self.last_step}; steps must strictly increase")
        missing = [name for name in self.params if name not in weights]
        if missing:
            raise StoreError(f"{self.path}: snapshot at step {step} lacks matrices {missing}")
        row = self.length
        for name in self.params:
            self._write_update(name, row, np.asarray(weights[name]), step)
        self._write_scalars(row, scalars or {})
        append_value(self._time, row, _time.time() - self.created if time is None else float(time))
        append_value(self._steps, row, step)  # the commit
        self.length = row + 1
        self.last_step = step

    def _write_update(self, name: str, row: int, w: np.ndarray, step: int) -> None:
        init = self._init[name]
        if w.shape != init.shape:
            raise StoreError(f"{self.path}: matrix {name!r} at step {step} has shape {w.shape}; "
                             f"the store holds {init.shape}")
        array = self._updates[name]
        array.resize((row + 1, *init.shape))
        array[row] = np.subtract(w, init, dtype=array.dtype)

    def _write_scalars(self, row: int, scalars: Mapping[str, float]) -> None:
        for name in scalars:
            if name not in self._scalars:
                series_array(self._scalars, name, np.float64, np.nan).resize((row,))
        for name, array in self._scalars.arrays():
            append_value(array, row, float(scalars.get(name, np.nan)))


def create_run(path: str | Path, specs: Sequence[MatrixSpec], init: Mapping[str, np.ndarray],
               *, meta: Mapping[str, Any] | None = None, update_dtype: str = "float64",
               compressors: Any = "auto") -> RunWriter:
    """Create a new store at ``path`` holding W_0 (``init``: name → (m, n)) for each spec.

    ``meta`` is merged into attrs["spectra"] (must be JSON-serialisable). ``compressors`` for the
    matrices: "auto" = MATRIX_COMPRESSORS, None = raw, or zarr codecs. Raises StoreError if
    ``path`` exists and is not empty.
    """
    path = Path(path)
    if update_dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_dtype={update_dtype!r}; accepted: {UPDATE_DTYPES}")
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path}: exists and is not empty; refusing to overwrite it")
    if not specs:
        raise ValueError("create_run needs at least one matrix spec")
    if isinstance(compressors, str) and compressors == "auto":
        compressors = MATRIX_COMPRESSORS
    now = _time.time()
    attrs = {
        **(meta or {}),
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
        "created_unix": now,
        "params": [spec.name for spec in specs],
        "update_dtype": update_dtype,
    }
    root = zarr.open_group(path, mode="w", attributes={"spectra": attrs}, use_consolidated=False)
    params = root.create_group("params")
    for spec in specs:
        w0 = np.asarray(init[spec.name])
        init_dtype = np.float64 if w0.dtype == np.float64 else np.float32
        group = params.create_group(spec.name, attributes={
            **spec.attrs, "name": spec.name, "shape": list(spec.shape),
            "original_shape": list(spec.original_shape), "kind": spec.kind,
            "dtype": spec.dtype or str(w0.dtype)})
        group.create_array("init", data=w0.astype(init_dtype), chunks=spec.shape,
                           dimension_names=("row", "col"), compressors=compressors)
        group.create_array("updates", shape=(0, *spec.shape), chunks=(1, *spec.shape),
                           dtype=update_dtype, fill_value=np.nan, compressors=compressors,
                           dimension_names=("snapshot", "row", "col"))
    root.require_group("scalars")
    series_array(root, "time", np.float64, np.nan)
    series_array(root, "steps", np.int64, UNCOMMITTED_STEP)  # created last: its presence = complete
    return RunWriter(root)


def resume_run(path: str | Path) -> RunWriter:
    """Reopen an existing store for writing, cutting every array back to the committed length."""
    root = open_root(Path(path), mode="r+")
    if "steps" not in root:
        raise StoreError(f"{path}: store creation was interrupted before its first snapshot; "
                         "it holds no recorded data and can be deleted")
    length = committed_length(root["steps"])
    for array in series_arrays(root):
        if array.shape[0] > length:
            array.resize((length,))
    for name in root.attrs["spectra"]["params"]:
        updates = root[f"params/{name}/updates"]
        if updates.shape[0] > length:
            updates.resize((length, *updates.shape[1:]))
    return RunWriter(root)


def annotate_run(path: str | Path, **fields: Any) -> None:
    """Merge JSON-serialisable ``fields`` into a store's attrs["spectra"] (e.g. a run's final
    evaluation history). Do not call while a Recorder is resuming the same store."""
    root = open_root(Path(path), mode="r+")
    root.attrs["spectra"] = {**root.attrs["spectra"], **fields}
