"""Creating a run store, atomically where the backend allows it.

Local directories: the store is built in a hidden sibling (``.<name>.creating-<host>-<pid>-…``)
and renamed into place, so a process killed at any instant leaves either no store or a complete,
empty one (plus, at worst, a hidden sibling that the next creation on this host removes).
Replacing a store (``overwrite=True``) takes its writer lock first, then swaps the new store in
by two renames.

fsspec URLs (object stores have no rename): the store is built in place and the root's
``attrs["spectra"]`` is written last, so an interrupted creation is recognisable
(:func:`existing` says "interrupted") and is rebuilt by the next writer.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import shutil
import socket
import time as _time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from spectra.store.format import (CHECKSUM, MATRIX_COMPRESSORS, SCHEMA_VERSION, SERIES_CHUNK,
                                  UNCOMMITTED_STEP, UPDATE_DTYPES, MatrixSpec, StoreError,
                                  open_zarr, series_array)
from spectra.store.location import Location, PathOrURL
from spectra.store.lock import StoreLock, pid_alive
from spectra.store.writer import RunWriter

# updates/c.<row>.0.0: one file per snapshot in one folder, not a folder per snapshot (two fewer
# mkdir calls per row, half the inodes)
FLAT_CHUNK_KEYS = {"name": "default", "separator": "."}
_OUR_MEMBERS = {"params", "scalars", "time", "digests", "steps", "locks"}


class CreatedElsewhere(StoreError):
    """Another process created a store at the same location while this one was building its
    own; open that one instead."""


def existing(location: PathOrURL | Location) -> str:
    """What is at ``location``: "absent" (nothing, or an empty directory), "store" (a run
    store), "interrupted" (a run store whose creation never finished) or "other"."""
    location = Location.of(location)
    if location.is_empty_or_absent():
        return "absent"
    try:
        root = open_zarr(location, mode="r")
        meta = root.attrs.get("spectra")
        members = set(root.group_keys()) | set(root.array_keys())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return "other"
    if isinstance(meta, dict):
        return "store" if "steps" in members else "interrupted"
    return "interrupted" if members <= _OUR_MEMBERS else "other"


def create_run(location: PathOrURL | Location, specs: Sequence[MatrixSpec],
               init: Mapping[str, np.ndarray], *, meta: Mapping[str, Any] | None = None,
               update_dtype: str = "float64", compressors: Any = "auto",
               overwrite: bool = False) -> RunWriter:
    """Create a new store at ``location`` (a path or URL) holding W_0 (``init``: name → (m, n))
    for each spec, and return its writer (which holds the store's writer lock).

    ``meta`` is merged into attrs["spectra"] (must be JSON-serialisable). ``compressors`` for the
    matrices: "auto" = MATRIX_COMPRESSORS, None = raw, or zarr codecs; a crc32c checksum is
    always appended. Raises StoreError if something is at ``location``, unless it is a run
    store and ``overwrite``, which is then replaced. A store whose creation was interrupted
    (it holds no snapshot) is replaced, with a warning.
    """
    location = Location.of(location)
    if update_dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_dtype={update_dtype!r}; accepted: {UPDATE_DTYPES}")
    if not specs:
        raise ValueError("create_run needs at least one matrix spec")
    found = existing(location)
    if found == "other" or (found == "store" and not overwrite):
        what, hint = (("a run store", "pass overwrite=True to replace it") if found == "store"
                      else ("not a run store", "choose another path"))
        raise StoreError(f"{location}: exists and is {what}; refusing to overwrite it ({hint})")
    if found == "interrupted":
        warnings.warn(f"{location}: the creation of this store was interrupted before it "
                      "completed (it holds no snapshot); creating it again", RuntimeWarning,
                      stacklevel=2)
    replace = found != "absent"
    content = _Content(specs, init, _attributes(meta, specs, update_dtype), update_dtype,
                       _codecs(compressors))
    if location.is_local:
        return _create_local(location, content, replace)
    return _create_in_place(location, content, replace)


class _Content:
    """What a new store holds, and how to build it at a location."""

    def __init__(self, specs: Sequence[MatrixSpec], init: Mapping[str, np.ndarray],
                 attrs: dict[str, Any], update_dtype: str, codecs: tuple):
        self.specs, self.init, self.attrs = specs, init, attrs
        self.update_dtype, self.codecs = update_dtype, codecs

    def build(self, location: Location) -> StoreLock:
        """Write the store at ``location``, ``steps`` and then the root attributes last; return
        its writer lock, taken once the (emptied) group exists."""
        root = zarr.open_group(store=location.zarr_store(read_only=False), mode="w",
                               use_consolidated=False)
        lock = StoreLock(location).acquire()
        try:
            params = root.create_group("params")
            for spec in self.specs:
                w0 = np.asarray(self.init[spec.name])
                group = params.create_group(spec.name, attributes={
                    **spec.attrs, "name": spec.name, "shape": list(spec.shape),
                    "original_shape": list(spec.original_shape), "kind": spec.kind,
                    "dtype": spec.dtype or str(w0.dtype)})
                init_dtype = np.float64 if w0.dtype == np.float64 else np.float32
                group.create_array("init", data=w0.astype(init_dtype), chunks=spec.shape,
                                   dimension_names=("row", "col"), compressors=self.codecs,
                                   config={"write_empty_chunks": True})  # a zero W_0 too
                group.create_array("updates", shape=(SERIES_CHUNK, *spec.shape),
                                   chunks=(1, *spec.shape), dtype=self.update_dtype,
                                   fill_value=np.nan, compressors=self.codecs,
                                   dimension_names=("snapshot", "row", "col"),
                                   chunk_key_encoding=FLAT_CHUNK_KEYS)
            root.create_group("scalars")
            series_array(root, "time", np.float64, np.nan, SERIES_CHUNK)
            series_array(root, "digests", np.uint32, 0, SERIES_CHUNK, columns=len(self.specs))
            series_array(root, "steps", np.int64, UNCOMMITTED_STEP, SERIES_CHUNK)
            root.attrs["spectra"] = self.attrs  # last: from now on it is a run store
        except BaseException:
            lock.release()
            raise
        return lock


def _create_local(location: Location, content: _Content, replace: bool) -> RunWriter:
    path = location.local
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_siblings(location)
    old_lock = StoreLock(location).acquire() if replace else None  # refuse before building
    temp = Location.of(path.parent / f".{path.name}.creating-{_tag()}")
    lock = None
    try:
        temp.local.mkdir()
        lock = content.build(temp)
        _move_into_place(temp, location, replace)
        lock.moved_to(location)
        return RunWriter(location, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(temp.local, ignore_errors=True)
        raise
    finally:
        if old_lock is not None:
            old_lock.release()


def _move_into_place(temp: Location, location: Location, replace: bool) -> None:
    path = location.local
    if replace and path.exists():
        trash = path.parent / f".{path.name}.replaced-{_tag()}"
        os.rename(path, trash)
        os.rename(temp.local, path)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(temp.local, path)  # replaces an empty directory; fails on a non-empty one
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise CreatedElsewhere(f"{location}: another process created it meanwhile") from None
        raise


def _create_in_place(location: Location, content: _Content, replace: bool) -> RunWriter:
    if replace:
        StoreLock(location).acquire().release()  # refuse if a writer holds it (best effort)
    lock = content.build(location)
    try:
        return RunWriter(location, lock)
    except BaseException:
        lock.release()
        raise


def _remove_abandoned_siblings(location: Location) -> None:
    """Hidden siblings left by creations killed on this host (their pid is gone)."""
    host = socket.gethostname()
    for kind in ("creating", "replaced"):
        for sibling in location.local.parent.glob(f".{location.local.name}.{kind}-{host}-*"):
            pid = sibling.name.removeprefix(f".{location.local.name}.{kind}-{host}-").split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _attributes(meta: Mapping[str, Any] | None, specs: Sequence[MatrixSpec],
                update_dtype: str) -> dict[str, Any]:
    now = _time.time()
    return {**(meta or {}), "schema": SCHEMA_VERSION,
            "created": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(),
            "created_unix": now, "params": [spec.name for spec in specs],
            "update_dtype": update_dtype, "committed": 0}


def _codecs(compressors: Any) -> tuple:
    """The matrices' bytes-to-bytes codecs, the crc32c checksum last."""
    if isinstance(compressors, str) and compressors == "auto":
        compressors = MATRIX_COMPRESSORS
    codecs = tuple(compressors or ())
    return codecs if codecs and codecs[-1] == CHECKSUM else (*codecs, CHECKSUM)
