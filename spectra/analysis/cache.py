"""The analysis cache: per-snapshot SVD results that analyze() reuses.

Where it lives (:func:`open_cache`): in the run store's ``analysis/`` group (the default); in a
zarr group of its own (``cache=PATH``, a path or an fsspec URL, e.g. for a store someone else
owns); or in memory
(``cache="memory"``, and automatically, with a warning, when the store cannot be written).
Deleting it only costs recomputation. Layout::

    analysis/                        attrs: {store: {created_unix}} — whose cache it is
      k<k>/<target>/<param>/         attrs: {k, length}   ← length written LAST: the commit
        snapshot   float64 (T, 2)    which snapshot each row is: (step, time) (a store cut back
                                     and recorded again reuses steps, never times)
        sv         float64 (T, r)    all r = min(m, n) singular values, descending
        u          float64 (T, m, k) top-k left singular vectors           (k > 0 only)
        vh         float64 (T, k, n) top-k right singular vectors          (k > 0 only)
        stability  float64 (T,)      OIALR full-basis stability against the previous snapshot
                                     (NaN at t = 0)                        (k > 0 only)

k is the top-k size used for that matrix (clamped to its smaller side), so analyses with
different k keep their own entries.

Concurrency (several analyze() processes, dask workers, a live store). Rows below ``length``
are final: they are written before ``length`` is raised and never rewritten while they match
the store. An entry is extended, cut back (when the store was cut back under it) and read only
while its lock is held: a spectra.store.StoreLock named ``analysis-cache.k<k>.<target>.<param>``
(the file ``locks/<name>/zarr.json`` of the store, or of the cache's own folder, like the
writer's lock), an OS advisory lock that dies with its process (a killed worker's is taken over
with a warning). Locking per entry lets several processes extend
different entries at once; holding the lock while a chunk is computed means a second process
waits for it and then finds the rows done, instead of computing them twice. A reader trusts rows below ``length`` whose (step, time) match the store's
committed snapshots, and nothing else. Arrays are chunked by up to 32 snapshots (about 1 MB),
uncompressed (SVD outputs in float64 barely compress, and an append rewrites at most one
partial chunk), and created for the run's length, growing by doubling, so that an append
writes rows and one attribute, not metadata: zarr's fixed cost per operation is what dominates
small matrices. A cache in memory has no locks: it belongs to one process.
"""

from __future__ import annotations

import contextlib
import errno
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import MemoryStore

from spectra.store import ANALYSIS_LOCK, Location, Run, StoreLock, StoreReadOnly
from spectra.store.format import open_root, open_zarr

_DIMS = {"snapshot": ("snapshot", "field"), "sv": ("snapshot", "index"),
         "u": ("snapshot", "row", "component"), "vh": ("snapshot", "component", "col"),
         "stability": ("snapshot",)}
_MAX_CHUNK_ROWS = 32
_CHUNK_BYTES = 2**20
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


class Entry:
    """One (k, target, param) entry: its committed rows, read lazily, and its extension."""

    def __init__(self, parent: zarr.Group, param: str, k: int):
        self._parent, self._param, self._k = parent, param, k
        try:
            self._group: zarr.Group | None = parent[param]
        except KeyError:
            self._group = None
        self._arrays: dict[str, zarr.Array] = {}
        self.length = int(self._group.attrs.get("length", 0)) if self._group is not None else 0

    def __bool__(self) -> bool:
        return self.length > 0

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array ``name``, within the committed ``length``."""
        if not 0 <= start <= stop <= self.length:
            raise IndexError(f"rows [{start}, {stop}) outside the {self.length} cached rows")
        return self._array(name)[start:stop]

    def valid_length(self, run: Run) -> int:
        """How many leading rows belong to ``run``'s committed snapshots (same step and time)."""
        length = min(self.length, len(run))
        if not length:
            return 0
        snapshot = self.read("snapshot", 0, length)
        same = (snapshot[:, 0] == run.steps[:length]) & (snapshot[:, 1] == run.time[:length])
        return length if same.all() else int(np.argmin(same))

    def append(self, start: int, rows: Mapping[str, np.ndarray], capacity: int = 0) -> None:
        """Write ``rows`` (name → (C, ...) arrays, "snapshot" included) at row ``start``, cutting
        the entry back to ``start`` first; then commit the new length. New arrays are made for
        ``capacity`` rows. Call with the entry's lock held."""
        if start > self.length:
            raise ValueError(f"cannot append {self._param} (k={self._k}) at row {start}: it "
                             f"has {self.length} rows")
        if self._group is None or start == 0:
            self._group = self._parent.create_group(
                self._param, overwrite=True, attributes={"k": self._k, "length": 0})
            self._arrays = {}
        elif start < self.length:
            self._group.attrs["length"] = start  # cut back first: rows from start on are rewritten
        self.length = start
        stop = start + len(next(iter(rows.values())))
        for name, values in rows.items():
            array = self._array(name, values, max(stop, capacity))
            if array.shape[0] < stop:
                array.resize((max(stop, 2 * array.shape[0]), *values.shape[1:]))
            array[start:stop] = values
        self._group.attrs["length"] = self.length = stop

    def _array(self, name: str, like: np.ndarray | None = None, rows: int = 0) -> zarr.Array:
        """Array ``name``, opened once; made for ``rows`` rows shaped like ``like`` if absent."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group[name]
            except KeyError:
                if like is None:
                    raise
                self._arrays[name] = self._group.create_array(
                    name, shape=(rows, *like.shape[1:]), dtype=np.float64,
                    chunks=(_chunk_rows(like), *like.shape[1:]), compressors=None,
                    fill_value=np.nan, dimension_names=_DIMS[name])
        return self._arrays[name]


class AnalysisCache:
    """The cached SVD results of one run store, wherever they live (module docstring).

    Use :func:`open_cache`; ``location`` says where (the store's, a cache path's or URL's, or
    None for memory) and is what dask workers reopen it from.
    """

    def __init__(self, root: zarr.Group, location: Location | None, kind: str):
        self._root = root
        self.location = location
        self.kind = kind  # "store", "path" or "memory"
        self._parents: dict[str, zarr.Group] = {}

    @property
    def shared(self) -> bool:
        """True when other processes can open it (it is not in memory)."""
        return self.kind != "memory"

    def entry(self, target: str, param: str, k: int) -> Entry:
        """The entry of (target, param) with top-k size ``k``, as committed now."""
        path = f"k{k}/{target}"
        if path not in self._parents:
            self._parents[path] = self._root.require_group(path)
        return Entry(self._parents[path], param, k)

    @contextlib.contextmanager
    def lock(self, target: str, param: str, k: int) -> Iterator[None]:
        """Hold the entry's lock (module docstring), waiting as long as another holder works;
        a no-op in memory."""
        if self.location is None:
            yield
            return
        lock = StoreLock(self.location, name=f"{ANALYSIS_LOCK}.k{k}.{target}.{param}",
                         purpose="analysis cache")
        lock.acquire(timeout=math.inf)
        try:
            yield
        finally:
            lock.release()


def open_cache(run: Run, cache: str | Path | Location | None = None) -> AnalysisCache:
    """The analysis cache of ``run``: in the store (``cache=None``; in memory with a warning if
    the store cannot be written), at a path or fsspec URL of its own, or in memory
    (``cache="memory"``)."""
    if isinstance(cache, str) and cache == "memory":
        return _in_memory(run)
    if cache is not None:
        return _at_path(run, Location.of(cache))
    try:
        group = open_root(run.location, mode="r+").require_group("analysis")
        _check_owner(group, run, run.location.child("analysis"))
        _probe_lock(run.location)
    except (OSError, StoreReadOnly) as exc:
        if isinstance(exc, OSError) and exc.errno not in _READ_ONLY_ERRORS:
            raise
        warnings.warn(f"{run.path} cannot be written ({exc}): its analysis is cached in memory "
                      "for this call only; pass cache=PATH to keep it", UserWarning, stacklevel=3)
        return _in_memory(run)
    return AnalysisCache(group, run.location, "store")


def _at_path(run: Run, path: Location) -> AnalysisCache:
    if _same(path, run.location):
        raise ValueError(f"cache={path} is the store itself; pass None to cache inside it")
    try:
        group = open_zarr(path, mode="a")
        _check_owner(group, run, path)
        _probe_lock(path)
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError) as exc:
        raise ValueError(f"cache={path}: not a zarr group ({exc})") from None
    except (PermissionError, StoreReadOnly) as exc:
        raise ValueError(f"cache={path} cannot be written ({exc}); pass a folder you can "
                         "write, or cache='memory'") from None
    return AnalysisCache(group, path, "path")


def _in_memory(run: Run) -> AnalysisCache:
    group = zarr.open_group(MemoryStore(), mode="w")
    _check_owner(group, run, None)
    return AnalysisCache(group, None, "memory")


def _same(a: Location, b: Location) -> bool:
    if a.is_local and b.is_local:
        return a.local.resolve() == b.local.resolve()
    return a.url == b.url


def _check_owner(group: zarr.Group, run: Run, where: Location | None) -> None:
    """Stamp an empty cache with its store's identity; refuse a cache of another store."""
    created = run.attrs.get("created_unix")
    owner = group.attrs.get("store")
    if owner is None:
        group.attrs["store"] = {"created_unix": created, "path": str(run.path)}
    elif owner.get("created_unix") != created:
        raise ValueError(f"the analysis cache at {where} belongs to another store "
                         f"({owner.get('path')}, created {owner.get('created_unix')}); "
                         "pass another cache= path")


def _probe_lock(location: Location) -> None:
    """Take and give back the cache's lock: raises StoreReadOnly where it cannot be written
    (also on read-only mounts, which permission bits do not show)."""
    StoreLock(location, name=ANALYSIS_LOCK, purpose="analysis cache").acquire(math.inf).release()


def _chunk_rows(values: np.ndarray) -> int:
    """Snapshots per chunk: about _CHUNK_BYTES, at most _MAX_CHUNK_ROWS, at least 1."""
    row_bytes = max(1, values[0].nbytes) if len(values) else 8
    return int(max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes)))
