"""The analysis cache: per-snapshot SVD results that analyze() reuses.

Where it lives (:func:`open_cache`): in the run store's ``analysis/`` group (the default); in a
zarr group of its own (``cache=PATH``, e.g. for a store someone else owns); or in memory
(``cache="memory"``, and automatically, with a warning, when the store cannot be written).
Deleting it only costs recomputation. Layout::

    analysis/                        attrs: {store: {created_unix}} — whose cache it is
      k<k>/<target>/<param>/         attrs: {k, length}   ← length written LAST: the commit
        steps      int64 (T,)        which snapshot each row is: its step and its time (a store
        time       float64 (T,)      cut back and recorded again reuses steps, never times)
        sv         float64 (T, r)    all r = min(m, n) singular values, descending
        u          float64 (T, m, k) top-k left singular vectors           (k > 0 only)
        vh         float64 (T, k, n) top-k right singular vectors          (k > 0 only)
        stability  float64 (T,)      OIALR full-basis stability against the previous snapshot
                                     (NaN at t = 0)                        (k > 0 only)
      locks                          an empty array whose folder holds the entries' lock files
                                     (an array, so that zarr never lists them)

k is the top-k size used for that matrix (clamped to its smaller side), so analyses with
different k keep their own entries.

Concurrency (several analyze() processes, dask workers, a live store). Rows below ``length``
are final: they are written before ``length`` is raised and never rewritten while they match
the store. An entry is extended, cut back (when the store was cut back under it) and read only
while its lock is held: an OS advisory lock (fcntl) on a file of its own, so a process that
dies releases it. A reader trusts rows below ``length`` whose (step, time) match the store's
committed snapshots, and nothing else. Arrays are chunked by up to 32 snapshots (about 1 MB),
uncompressed: SVD outputs in float64 barely compress, and an append rewrites at most one
partial chunk. A cache in memory has no locks: it belongs to one process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import MemoryStore

from spectra.store import Run
from spectra.store.format import open_root

_DIMS = {"steps": ("snapshot",), "time": ("snapshot",), "sv": ("snapshot", "index"),
         "u": ("snapshot", "row", "component"), "vh": ("snapshot", "component", "col"),
         "stability": ("snapshot",)}
_DTYPES = {"steps": np.int64}
_MAX_CHUNK_ROWS = 32
_CHUNK_BYTES = 2**20
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


class Entry:
    """The committed rows of one (k, target, param) entry, read lazily."""

    def __init__(self, group: zarr.Group | None):
        self._group = group
        self.length = int(group.attrs.get("length", 0)) if group is not None else 0

    def __bool__(self) -> bool:
        return self.length > 0

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (stop defaults to ``length``)."""
        stop = self.length if stop is None else stop
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.length} cached rows")
        return self._group[name][start:stop]

    def valid_length(self, run: Run) -> int:
        """How many leading rows belong to ``run``'s committed snapshots (same step and time)."""
        length = min(self.length, len(run))
        if not length:
            return 0
        same = ((self.read("steps", 0, length) == run.steps[:length])
                & (self.read("time", 0, length) == run.time[:length]))
        return length if same.all() else int(np.argmin(same))


class AnalysisCache:
    """The cached SVD results of one run store, wherever they live (module docstring).

    Use :func:`open_cache`; ``location`` says where (a store path, a cache path or None for
    memory) and is what dask workers reopen it from.
    """

    def __init__(self, root: zarr.Group, location: Path | None, kind: str):
        self._root = root
        self.location = location
        self.kind = kind  # "store", "path" or "memory"
        self._locks = Path(location, "analysis" if kind == "store" else "", "locks") \
            if location is not None else None

    @property
    def shared(self) -> bool:
        """True when other processes can open it (it is not in memory)."""
        return self.kind != "memory"

    def entry(self, target: str, param: str, k: int) -> Entry:
        """The cached rows of (target, param) with top-k size ``k`` (empty if none)."""
        try:
            group = self._root[_key(target, param, k)]
        except KeyError:
            group = None
        return Entry(group)

    @contextlib.contextmanager
    def lock(self, target: str, param: str, k: int) -> Iterator[None]:
        """Hold the entry's lock (module docstring); a no-op in memory."""
        if self._locks is None:
            yield
            return
        path = self._locks / f"k{k}.{target}.{param}.lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def append(self, target: str, param: str, k: int, start: int,
               rows: Mapping[str, np.ndarray]) -> None:
        """Write ``rows`` (name → (C, ...) arrays, steps and time included) at row ``start``,
        cutting the entry back to ``start`` first; then commit the new length. Call with the
        entry's lock held."""
        key = _key(target, param, k)
        group = self._root.get(key) if start else None
        if group is None and start:
            raise ValueError(f"cannot append {key} at row {start}: no cached rows before it")
        if group is None:
            group = self._root.require_group(key.rsplit("/", 1)[0]).create_group(
                param, overwrite=True, attributes={"k": k, "length": 0})
        if start < int(group.attrs["length"]):
            group.attrs["length"] = start  # cut back first: rows from start on are rewritten
        count = len(next(iter(rows.values())))
        for name, values in rows.items():
            shape = (start + count, *values.shape[1:])
            if name in group:
                array = group[name]
                array.resize(shape)
            else:
                array = group.create_array(
                    name, shape=shape, dtype=_DTYPES.get(name, np.float64),
                    chunks=(_chunk_rows(values), *values.shape[1:]), compressors=None,
                    fill_value=-1 if name == "steps" else np.nan, dimension_names=_DIMS[name])
            array[start:start + count] = values
        group.attrs["length"] = start + count


def open_cache(run: Run, cache: str | Path | None = None) -> AnalysisCache:
    """The analysis cache of ``run``: in the store (``cache=None``; in memory with a warning if
    the store cannot be written), at a path of its own, or in memory (``cache="memory"``)."""
    if isinstance(cache, str) and cache == "memory":
        return _in_memory(run)
    if cache is not None:
        return _at_path(run, Path(cache))
    try:
        group = open_root(run.path, mode="r+").require_group("analysis")
        _check_owner(group, run, run.path / "analysis")
        _make_lock_folder(group)
        _probe(run.path / "analysis" / "locks")
    except OSError as exc:
        if exc.errno not in _READ_ONLY_ERRORS:
            raise
        warnings.warn(f"{run.path} cannot be written ({exc.strerror}): its analysis is cached in "
                      "memory for this call only; pass cache=PATH to keep it", UserWarning,
                      stacklevel=3)
        return _in_memory(run)
    return AnalysisCache(group, run.path, "store")


def _at_path(run: Run, path: Path) -> AnalysisCache:
    if path.resolve() == run.path.resolve():
        raise ValueError(f"cache={path} is the store itself; pass None to cache inside it")
    try:
        group = zarr.open_group(path, mode="a", use_consolidated=False)
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError) as exc:
        raise ValueError(f"cache={path}: not a zarr group ({exc})") from None
    _check_owner(group, run, path)
    _make_lock_folder(group)
    return AnalysisCache(group, path, "path")


def _in_memory(run: Run) -> AnalysisCache:
    group = zarr.open_group(MemoryStore(), mode="w")
    _check_owner(group, run, None)
    return AnalysisCache(group, None, "memory")


def _check_owner(group: zarr.Group, run: Run, where: Path | None) -> None:
    """Stamp an empty cache with its store's identity; refuse a cache of another store."""
    created = run.attrs.get("created_unix")
    owner = group.attrs.get("store")
    if owner is None:
        group.attrs["store"] = {"created_unix": created, "path": str(run.path)}
    elif owner.get("created_unix") != created:
        raise ValueError(f"the analysis cache at {where} belongs to another store "
                         f"({owner.get('path')}, created {owner.get('created_unix')}); "
                         "pass another cache= path")


def _make_lock_folder(group: zarr.Group) -> None:
    if "locks" not in group:
        group.create_array("locks", shape=(0,), dtype=np.uint8)


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: raises OSError where it cannot be written (also
    on read-only mounts, which permission bits do not show)."""
    probe = folder / f"probe-{os.getpid()}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))
    probe.unlink()


def _key(target: str, param: str, k: int) -> str:
    return f"k{k}/{target}/{param}"


def _chunk_rows(values: np.ndarray) -> int:
    """Snapshots per chunk: about _CHUNK_BYTES, at most _MAX_CHUNK_ROWS, at least 1."""
    row_bytes = max(1, values[0].nbytes) if len(values) else 8
    return int(max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes)))
