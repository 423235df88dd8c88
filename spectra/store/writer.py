"""Writing a run store: :class:`RunWriter`, the single writer, and the commit protocol.

A writer holds the store's writer lock (spectra.store.lock) from the moment it opens the store
until :meth:`RunWriter.close`. :meth:`RunWriter.write` writes one snapshot's matrix rows;
:meth:`RunWriter.commit` makes every written snapshot visible, in this order: the rows of
``time``, ``digests`` and ``scalars/*``, then ``steps`` (the commit), then the lower bound
``attrs["spectra"]["committed"]`` that lets readers tell a damaged ``steps`` chunk from a short
store. Arrays are grown ahead, :data:`SERIES_CHUNK` snapshots at a time (one metadata write per
array per 1024 snapshots instead of one per snapshot), and cut to the committed length at close.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from spectra.store import chunks
from spectra.store.chunks import ChunkWriter
from spectra.store.format import (SERIES_CHUNK, UNCOMMITTED_STEP, MatrixSpec, StoreError,
                                  StoreVanished, digest, open_root, read_spec, resize,
                                  series_array, series_arrays)
from spectra.store.location import Location, PathOrURL
from spectra.store.lock import StoreLock
from spectra.store.reader import committed_steps, written_by_schema_2

_REMOTE_CHECK_EVERY = 10.0  # seconds between "is the store still there" checks on fsspec URLs


@dataclass
class _Pending:
    """A written but uncommitted snapshot."""

    step: int
    time: float
    digests: list[int]
    scalars: dict[str, float] = field(default_factory=dict)


class _Series:
    """A per-snapshot array whose current chunk is kept in memory and rewritten whole."""

    def __init__(self, array: zarr.Array, length: int, step_of: chunks.StepOf):
        self._writer = ChunkWriter(array)
        self.array = self._writer.array
        self._chunk_index = -1
        self._values: np.ndarray | None = None
        self._load(length // SERIES_CHUNK, length, step_of)

    def put(self, first: int, values: np.ndarray, *, backwards: bool = False) -> None:
        """Set rows [first, first + len(values)) and write each chunk they touch (from the last
        chunk to the first with ``backwards``, so that a cut interrupted midway still leaves
        committed rows a prefix)."""
        spans = []
        row = first
        while row < first + len(values):
            index = row // SERIES_CHUNK
            stop = min(first + len(values), (index + 1) * SERIES_CHUNK)
            spans.append((index, row, stop))
            row = stop
        for index, start, stop in (reversed(spans) if backwards else spans):
            if index != self._chunk_index:
                self._load(index, start, None)
            offset = index * SERIES_CHUNK
            self._values[start - offset:stop - offset] = values[start - first:stop - first]
            self._writer.write((index,) + (0,) * (self.array.ndim - 1), self._values)

    def reload(self, length: int, step_of: chunks.StepOf) -> None:
        self._load(length // SERIES_CHUNK, length, step_of)

    def _load(self, index: int, length: int, step_of: chunks.StepOf | None) -> None:
        """Make chunk ``index`` current: its committed rows (< ``length``) read back, the rest
        the fill value (rows past the committed length are garbage from an earlier crash)."""
        shape = (SERIES_CHUNK, *self.array.shape[1:])
        self._values = np.full(shape, self.array.fill_value, dtype=self.array.dtype)
        start = index * SERIES_CHUNK
        if length > start:
            rows = slice(start, min(length, start + SERIES_CHUNK))
            self._values[:rows.stop - start] = chunks.read(self.array, rows, rows=[start],
                                                           step_of=step_of)
        self._chunk_index = index


class RunWriter:
    """The single writer of a run store; see the module docstring.

    Create with :func:`spectra.store.create_run` or :func:`resume_run`; then :meth:`append`
    (write + commit) once per snapshot, or :meth:`write` and :meth:`commit` to commit several
    snapshots at once; :meth:`close` at the end.
    """

    def __init__(self, location: PathOrURL | Location, lock: StoreLock, *,
                 length: int | None = None):
        self.location = Location.of(location)
        self.path: Path | str = self.location.local or self.location.url
        self._lock = lock
        self._root = root = open_root(self.location, mode="r+")
        self._meta = dict(root.attrs["spectra"])
        self.created: float = self._meta["created_unix"]
        self.params: list[str] = list(self._meta["params"])
        self._checksummed = written_by_schema_2(self._meta)
        steps = committed_steps(root) if length is None else None
        self.length = len(steps) if length is None else length
        self._steps = (steps if steps is not None else
                       chunks.read(root["steps"], slice(0, self.length)))[: self.length]
        self.last_step: int | None = int(self._steps[-1]) if self.length else None
        self._init = {name: self._read_init(name) for name in self.params}
        self._updates = {name: ChunkWriter(root[f"params/{name}/updates"], in_place=True)
                         for name in self.params}
        self._scalars = root.require_group("scalars")
        self._series = {name: _Series(array, self.length, self._step_of)
                        for name, array in series_arrays(root).items()}
        self._pending: list[_Pending] = []
        self._capacity = min(array.shape[0] for array in self._arrays())
        self._last_check = _time.monotonic()
        self._root_metadata = str(self.location.local / "zarr.json") if self.location.is_local else ""
        self.closed = False

    # -- reading back --------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of attrs["spectra"]."""
        return dict(self._meta)

    @property
    def pending(self) -> int:
        """Snapshots written but not committed yet."""
        return len(self._pending)

    @property
    def has_digests(self) -> bool:
        """Stores of schema ≥ 2 keep a CRC-32 digest of every recorded W_t."""
        return "digests" in self._series

    def spec(self, name: str) -> MatrixSpec:
        return read_spec(self._root, name)

    def init(self, name: str) -> np.ndarray:
        """W_0 of ``name`` as stored, (m, n)."""
        return self._init[name]

    def steps(self) -> np.ndarray:
        """The committed steps, int64 (T,)."""
        return self._steps[: self.length].copy()

    def digests(self) -> np.ndarray | None:
        """CRC-32 digests of the committed W_t, uint32 (T, P) in ``params`` order; None for
        stores without them (schema 1)."""
        if not self.has_digests:
            return None
        return chunks.read(self._root["digests"], slice(0, self.length),
                           rows=range(0, self.length, SERIES_CHUNK))

    def weights(self, name: str, row: int) -> np.ndarray:
        """W_t of ``name`` at committed snapshot ``row``, float64 (m, n)."""
        if not 0 <= row < self.length:
            raise StoreError(f"{self.location}: no committed snapshot {row}")
        array = self._root[f"params/{name}/updates"]
        update = chunks.read(array, row, rows=[row], step_of=self._step_of)
        chunks.check_fill_rows(array, update[None], [row], self._step_of)
        return self._init[name].astype(np.float64) + update

    def last_weights(self, name: str) -> np.ndarray:
        """W_t of ``name`` at the last committed snapshot, float64 (m, n)."""
        if self.length == 0:
            raise StoreError(f"{self.location}: no committed snapshot yet")
        return self.weights(name, self.length - 1)

    # -- writing -------------------------------------------------------------------------------

    def update_meta(self, **fields: Any) -> None:
        """Merge JSON-serialisable ``fields`` into attrs["spectra"] (one atomic write)."""
        self._check_alive(force=True)
        self._meta.update(fields)
        self._root.attrs["spectra"] = self._meta

    def append(self, step: int, weights: Mapping[str, np.ndarray],
               scalars: Mapping[str, float] | None = None, time: float | None = None) -> None:
        """Write and commit one snapshot (see :meth:`write`)."""
        self.write(step, weights, scalars, time)
        self.commit()

    def write(self, step: int, weights: Mapping[str, np.ndarray],
              scalars: Mapping[str, float] | None = None, time: float | None = None) -> None:
        """Write one snapshot's rows: W_t of every recorded matrix (name → (m, n)) at ``step``.

        Not visible to readers until :meth:`commit`. ``time`` defaults to seconds since the
        store was created. Raises StoreError if ``step`` does not increase or a matrix is
        missing or misshapen; nothing is written then.
        """
        step = int(step)
        last = self._pending[-1].step if self._pending else self.last_step
        if last is not None and step <= last:
            raise StoreError(f"{self.location}: snapshot step {step} is not after the last "
                             f"step {last}; steps must strictly increase")
        missing = [name for name in self.params if name not in weights]
        if missing:
            raise StoreError(f"{self.location}: snapshot at step {step} lacks matrices {missing}")
        for name in self.params:
            shape = np.shape(weights[name])
            if shape != self._init[name].shape:
                raise StoreError(f"{self.location}: matrix {name!r} at step {step} has shape "
                                 f"{shape}; the store holds {self._init[name].shape}")
        self._check_alive()
        row = self.length + len(self._pending)
        self._grow(row + 1)
        codes = []
        for name in self.params:
            w = np.asarray(weights[name])
            writer = self._updates[name]
            writer.write((row, 0, 0), np.subtract(w, self._init[name], dtype=writer.array.dtype))
            codes.append(digest(w))
        elapsed = _time.time() - self.created if time is None else float(time)
        values = {str(k): float(v) for k, v in (scalars or {}).items()}
        self._pending.append(_Pending(step, elapsed, codes, values))

    def commit(self) -> None:
        """Make every written snapshot visible: series rows, then ``steps``, then the count."""
        if not self._pending:
            return
        self._check_alive(force=True)
        first, rows = self.length, self._pending
        self._add_scalar_arrays({name for row in rows for name in row.scalars}, first)
        self._series["time"].put(first, np.array([row.time for row in rows]))
        if self.has_digests:
            self._series["digests"].put(first, np.array([row.digests for row in rows],
                                                        dtype=np.uint32))
        for name, series in self._series.items():
            if name.startswith("scalars/"):
                key = name.removeprefix("scalars/")
                series.put(first, np.array([row.scalars.get(key, np.nan) for row in rows]))
        steps = np.array([row.step for row in rows], dtype=np.int64)
        self._series["steps"].put(first, steps)  # the commit
        self._steps = np.concatenate([self._steps[: self.length], steps])
        self.length += len(rows)
        self.last_step = int(steps[-1])
        self._pending = []
        self._meta["committed"] = self.length
        self._root.attrs["spectra"] = self._meta

    def keep_alive(self) -> None:
        """Refresh the lock's heartbeat and check that the store is still there (cheap; call
        it now and then while idle)."""
        self._check_alive()
        self._lock.heartbeat()

    def cut_back(self, length: int, record_key: str, record: Mapping[str, Any]) -> None:
        """Uncommit every snapshot from ``length`` on (``steps`` is reset to −1 from there to
        its end, so a damaged ``steps`` chunk past ``length`` goes too; nothing else is deleted)
        and append ``record`` to attrs["spectra"][record_key]. For rewinds and repairs only.
        The analysis cache is left alone: its rows name the (step, time) of their snapshot, so
        rows of dropped snapshots are recognised and recomputed (spectra.analysis.cache)."""
        if self._pending:
            raise RuntimeError("cut_back() with uncommitted snapshots")
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot cut {self.location} back to {length} snapshots: it has "
                             f"{self.length}")
        history = list(self._meta.get(record_key, []))
        self._meta.update({record_key: history + [dict(record)], "committed": length})
        self._root.attrs["spectra"] = self._meta  # the lower bound first: it stays a lower bound
        steps = self._series["steps"]  # every entry from ``length`` on, to the array's end
        uncommitted = np.full(steps.array.shape[0] - length, UNCOMMITTED_STEP, dtype=np.int64)
        steps.put(length, uncommitted, backwards=True)
        self.length = length
        self._steps = self._steps[:length]
        self.last_step = int(self._steps[-1]) if length else None
        for series in self._series.values():
            series.reload(length, self._step_of)

    def close(self) -> None:
        """Commit, cut the arrays to the committed length and release the lock (idempotent)."""
        if self.closed:
            return
        try:
            self._check_alive(force=True)
            self.commit()
            self._fit_arrays(self.length)
        finally:
            self.closed = True
            self._lock.release()

    def abandon(self) -> None:
        """Release the lock without committing (after a write error)."""
        self.closed = True
        self._lock.release()

    # -- internals -----------------------------------------------------------------------------

    def _step_of(self, row: int) -> int | None:
        return int(self._steps[row]) if 0 <= row < len(self._steps) else None

    def _read_init(self, name: str) -> np.ndarray:
        array = self._root[f"params/{name}/init"]
        if self._checksummed:  # schema 1 stores did not write an all-zero W_0
            chunks.require_whole(array)
        return chunks.read(array, ...)

    def _grow(self, rows: int) -> None:
        """Make room for ``rows`` snapshot rows in every per-snapshot array."""
        if rows <= self._capacity:
            return
        if self._meta["schema"] < 2:  # before arrays outgrow what schema 1 allows
            self.update_meta(schema=2, upgraded_from=self._meta["schema"], committed=self.length)
        capacity = -(-rows // SERIES_CHUNK) * SERIES_CHUNK
        self._fit_arrays(capacity)
        self._capacity = capacity

    def _fit_arrays(self, rows: int) -> None:
        for array in self._arrays():
            resize(array, rows)

    def _arrays(self) -> list[zarr.Array]:
        """Every per-snapshot array."""
        return ([w.array for w in self._updates.values()]
                + [series.array for series in self._series.values()])

    def _add_scalar_arrays(self, names: set[str], first_row: int) -> None:
        """Create the arrays of scalars seen for the first time; earlier rows read NaN."""
        for name in sorted(names - {k.removeprefix("scalars/") for k in self._series}):
            array = series_array(self._scalars, name, np.float64, np.nan,
                                 max(self._capacity, first_row + 1))
            series = _Series(array, 0, self._step_of)
            for index in range(first_row // SERIES_CHUNK):  # earlier chunks exist, all NaN
                series.put(index * SERIES_CHUNK, np.full(SERIES_CHUNK, np.nan))
            self._series[f"scalars/{name}"] = series

    def _check_alive(self, force: bool = False) -> None:
        """Raise StoreVanished if the store was deleted, moved or replaced under us."""
        now = _time.monotonic()
        if not self.location.is_local and not force and now - self._last_check < _REMOTE_CHECK_EVERY:
            return
        self._last_check = now
        if self.closed:
            raise StoreError(f"{self.location}: this writer is closed")
        if self.location.is_local:
            intact = os.path.exists(self._root_metadata) and self._lock.still_ours()
        else:
            intact = self._lock.still_ours() and self.location.child("zarr.json").exists()
        if not intact:
            raise StoreVanished(f"{self.location}: the store was deleted, moved or replaced while "
                                f"being written; its last {self.length} committed snapshots "
                                "went with it, nothing more is written")



def resume_run(location: PathOrURL | Location) -> RunWriter:
    """Open an existing store for writing: take its writer lock (StoreLocked if another writer
    holds it), then read its committed length. Changes nothing in the store."""
    location = Location.of(location)
    open_root(location, mode="r")  # not a store: FileNotFoundError / StoreError, no lock file
    lock = StoreLock(location).acquire()
    try:
        root = open_root(location, mode="r")
        if "steps" not in root:
            raise StoreError(f"{location}: store creation was interrupted before it completed; "
                             "it holds no recorded data and can be deleted")
        return RunWriter(location, lock)
    except BaseException:
        lock.release()
        raise


def annotate_run(location: PathOrURL | Location, **fields: Any) -> None:
    """Merge JSON-serialisable ``fields`` into a store's attrs["spectra"] (e.g. a run's final
    evaluation history), under the writer lock (StoreLocked while a Recorder writes it)."""
    location = Location.of(location)
    open_root(location, mode="r")
    with StoreLock(location).acquire(timeout=10):
        root = open_root(location, mode="r+")
        root.attrs["spectra"] = {**root.attrs["spectra"], **fields}
