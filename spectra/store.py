"""The run store: one zarr v3 group per training run (schema in docs/store.md).

Layout::

    <run>.zarr/                 attrs["spectra"] = {schema, created, params, model, ...}
      steps    int64 (T,)       training step of each committed snapshot (written LAST: the commit)
      time     float64 (T,)     seconds since the store was created (wall clock)
      scalars/<name> (T,)       per-snapshot scalars (loss, lr, ...); NaN where not given
      params/<name>/            one group per recorded matrix
        init     (m, n)         W_0, float32 (float64 for float64 parameters)
        updates  (T, m, n)      ΔW_t = W_t − W_0, float64 by default, one snapshot per chunk
      analysis/...              derived results (spectra.analyze); safe to delete

Commit protocol. zarr grows an array's metadata before it writes the new chunk, and nothing is
transactional across arrays. So a snapshot writes every matrix's row, then its scalars and time,
and appends to ``steps`` last. ``steps`` has fill value −1: a row whose chunk never landed reads
as −1 and is not committed. Readers trust the committed length; a writer that resumes cuts every
longer array back to it. A process killed at any instant therefore leaves a store whose committed
snapshots are all intact (LocalStore writes each file atomically, by rename).

Exactness of ``weights = init + updates``. For float32 (and lower-precision) parameters the update
is stored as the float64 difference, which is exact whenever |W_t| > 2^-29·|W_0| or W_t = 0, so
``weights`` reproduces W_t bitwise in practice; the error is always below
2^-53·|W_t − W_0| + ulp(W_t)/2. With ``update_dtype="float32"`` (half the bytes) the error grows to
about ulp(max(|W_0|, |W_t|)).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA_VERSION = 1
UNCOMMITTED_STEP = -1
_SERIES_CHUNK = 1024  # steps/time/scalars: small 1-D arrays, rewritten atomically per append
_UPDATE_DTYPES = ("float64", "float32")
# Measured on the demo GPT's ΔW (float64): lz4 + bitshuffle wrote 128 MB/s at 0.52 of raw size,
# zarr's default zstd(3) 69 MB/s at 0.59, no compression 166 MB/s at 1.0 (docs/store.md).
MATRIX_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)

Index = int | slice | Sequence[int] | np.ndarray


class StoreError(ValueError):
    """A path that is not a usable spectra run store, or a store used inconsistently."""


@dataclass(frozen=True)
class MatrixSpec:
    """What the store keeps about one recorded matrix.

    name: parameter name in the model (e.g. "blocks.0.mlp.fc.weight").
    shape: (m, n) of the stored matrix; conv kernels (out, in, k...) become (out, in·k...).
    original_shape: the parameter's own shape.
    kind: "linear", "conv", "embedding", "effective" (a module's dense effective weight) or "matrix".
    """

    name: str
    shape: tuple[int, int]
    original_shape: tuple[int, ...]
    kind: str


class Run:
    """Read-only view of a run store. Everything is sliced to the committed snapshots.

    A store that is still being written can be read; call :meth:`refresh` to see new snapshots.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._root = _open_root(self.path, mode="r")
        meta = self._root.attrs["spectra"]
        if "steps" not in self._root:
            raise StoreError(
                f"{self.path}: store creation was interrupted before its first snapshot "
                "(no 'steps' array); it holds no recorded data and can be deleted"
            )
        self.attrs: dict[str, Any] = dict(meta)
        self.params: list[str] = list(meta["params"])
        self._specs = {name: _read_spec(self._root, name) for name in self.params}
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
            raise KeyError(_unknown_param_message(name, self.params)) from None

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
        return _read_spec(self._root, name)

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
        _append(self._time, row, _time.time() - self.created if time is None else float(time))
        _append(self._steps, row, step)  # the commit
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
                _series(self._scalars, name, np.float64, np.nan).resize((row,))
        for name, array in self._scalars.arrays():
            _append(array, row, float(scalars.get(name, np.nan)))


def create_run(path: str | Path, specs: Sequence[MatrixSpec], init: Mapping[str, np.ndarray],
               *, meta: Mapping[str, Any] | None = None, update_dtype: str = "float64",
               compressors: Any = "auto") -> RunWriter:
    """Create a new store at ``path`` holding W_0 (``init``: name → (m, n)) for each spec.

    ``meta`` is merged into attrs["spectra"] (must be JSON-serialisable). ``compressors`` for the
    matrices: "auto" = MATRIX_COMPRESSORS, None = raw, or zarr codecs. Raises StoreError if
    ``path`` exists and is not empty.
    """
    path = Path(path)
    if update_dtype not in _UPDATE_DTYPES:
        raise ValueError(f"update_dtype={update_dtype!r}; accepted: {_UPDATE_DTYPES}")
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
            "name": spec.name, "shape": list(spec.shape),
            "original_shape": list(spec.original_shape), "kind": spec.kind})
        group.create_array("init", data=w0.astype(init_dtype), chunks=spec.shape,
                           dimension_names=("row", "col"), compressors=compressors)
        group.create_array("updates", shape=(0, *spec.shape), chunks=(1, *spec.shape),
                           dtype=update_dtype, fill_value=np.nan, compressors=compressors,
                           dimension_names=("snapshot", "row", "col"))
    root.require_group("scalars")
    _series(root, "time", np.float64, np.nan)
    _series(root, "steps", np.int64, UNCOMMITTED_STEP)  # created last: its presence = complete
    return RunWriter(root)


def resume_run(path: str | Path) -> RunWriter:
    """Reopen an existing store for writing, cutting every array back to the committed length."""
    root = _open_root(Path(path), mode="r+")
    if "steps" not in root:
        raise StoreError(f"{path}: store creation was interrupted before its first snapshot; "
                         "it holds no recorded data and can be deleted")
    length = committed_length(root["steps"])
    for array in _series_arrays(root):
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
    root = _open_root(Path(path), mode="r+")
    root.attrs["spectra"] = {**root.attrs["spectra"], **fields}


def is_run_store(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a spectra run store."""
    try:
        _open_root(Path(path), mode="r")
    except (FileNotFoundError, StoreError):
        return False
    return True


def committed_length(steps: zarr.Array) -> int:
    """Number of committed snapshots: the length of ``steps`` minus trailing uncommitted rows."""
    length = steps.shape[0]
    if length == 0:
        return 0
    tail = np.asarray(steps[max(0, length - _SERIES_CHUNK):length])
    committed = np.flatnonzero(tail != UNCOMMITTED_STEP)
    return 0 if committed.size == 0 else length - tail.size + int(committed[-1]) + 1


def _open_root(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run store")
    try:
        root = zarr.open_group(path, mode=mode, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
            ValueError) as exc:
        raise StoreError(f"{path}: not a spectra run store (not a zarr group: {exc})") from None
    meta = root.attrs.get("spectra")
    if not isinstance(meta, dict) or "schema" not in meta:
        raise StoreError(f"{path}: a zarr group but not a spectra run store "
                         "(attrs['spectra'] is missing)")
    if meta["schema"] > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {meta['schema']} is newer than this spectra "
                         f"understands ({SCHEMA_VERSION}); upgrade spectra")
    return root


def _read_spec(root: zarr.Group, name: str) -> MatrixSpec:
    attrs = root[f"params/{name}"].attrs
    return MatrixSpec(name=name, shape=tuple(attrs["shape"]),
                      original_shape=tuple(attrs["original_shape"]), kind=attrs["kind"])


def _series(group: zarr.Group, name: str, dtype: Any, fill: Any) -> zarr.Array:
    """A 1-D per-snapshot array, empty."""
    return group.create_array(name, shape=(0,), chunks=(_SERIES_CHUNK,), dtype=dtype,
                              fill_value=fill, dimension_names=("snapshot",))


def _series_arrays(root: zarr.Group) -> list[zarr.Array]:
    arrays = [root["steps"], root["time"]]
    if "scalars" in root:
        arrays += [array for _, array in root["scalars"].arrays()]
    return arrays


def _append(array: zarr.Array, row: int, value: Any) -> None:
    array.resize((row + 1,))
    array[row] = value


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


def _unknown_param_message(name: str, params: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, params, n=3)
    hint = f"; did you mean {close}?" if close else f"; recorded: {list(params)[:10]}"
    return f"no recorded matrix {name!r}{hint}"
