"""Whole-chunk writes and checked reads of the store's arrays.

Writing. A snapshot writes whole chunks only (one ``updates`` row is one chunk; a series chunk
is rewritten whole). zarr's ``array[i] = x`` costs about 1.5–3 ms of Python and thread hand-offs
per call on a busy 2-core machine (docs/store.md), several times the file write itself, so
:class:`ChunkWriter` encodes the chunk with the array's own codecs and hands the bytes to the
store synchronously, through zarr's public sync protocols (``SupportsSyncCodec``,
``SupportsSetSync``); a snapshot's matrix rows may even skip the store's temporary file
(``in_place``). Stores or codecs without them (fsspec stores) take zarr's ordinary path. Either
way the file is zarr's: the same key, the same bytes (tests/test_store.py checks all three).

Reading. zarr reads a missing chunk as the fill value and lets a codec's error escape with no
word of where it happened. :func:`read` turns a checksum (or decompression) failure into a
:class:`StoreDamaged` error naming the array, the snapshot and the step, and
:func:`require_chunks` / :func:`check_fill_rows` turn a missing chunk into one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.abc.store import SupportsSetSync
from zarr.core.array_spec import ArrayConfig
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from spectra.store.format import StoreDamaged

StepOf = Callable[[int], int | None]  # snapshot row → its step (None if unknown)


class ChunkWriter:
    """Writes whole chunks of one array; ``fast`` when the store and codecs allow it.

    ``in_place``: write a local chunk file directly instead of zarr's temporary file + rename,
    which halves the cost of a small chunk. Only for chunks that no reader trusts before a later
    commit (the ``updates`` row of a snapshot being written): a file torn by a crash is then an
    uncommitted row, written over on resume.
    """

    def __init__(self, array: zarr.Array, in_place: bool = False):
        self.array = array.with_config({"write_empty_chunks": True})  # a NaN row is data too
        metadata = array.metadata
        self._codecs = tuple(getattr(metadata, "codecs", ()))
        self._store = array.store_path.store
        self._prefix = f"{array.store_path.path}/" if array.store_path.path else ""
        spec = metadata.get_chunk_spec((0,) * array.ndim,
                                       ArrayConfig(order="C", write_empty_chunks=True),
                                       default_buffer_prototype())
        self._shape, self._new_buffer = spec.shape, spec.prototype.nd_buffer.from_numpy_array
        self._steps = []  # (codec, the chunk's spec as that codec receives it)
        for codec in self._codecs:
            self._steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self.fast = (isinstance(self._store, SupportsSetSync) and bool(self._codecs)
                     and all(isinstance(c, SupportsSyncCodec) for c in self._codecs))
        local = in_place and self.fast and isinstance(self._store, LocalStore)
        self._folder = os.path.join(self._store.root, array.store_path.path) if local else None

    def write(self, chunk_coords: tuple[int, ...], values: np.ndarray) -> None:
        """Write the chunk at ``chunk_coords`` (a full chunk's worth of ``values``)."""
        values = np.ascontiguousarray(values, dtype=self.array.dtype).reshape(self._shape)
        if not self.fast:
            selection = _chunk_selection(self.array, chunk_coords)
            self.array[selection] = values[tuple(slice(0, s.stop - s.start) for s in selection)]
            return
        data: Any = self._new_buffer(values)
        for codec, spec in self._steps:
            data = codec._encode_sync(data, spec)
        key = self.array.metadata.encode_chunk_key(chunk_coords)
        if self._folder is None:
            self._store.set_sync(self._prefix + key, data)
        else:
            self._write_in_place(os.path.join(self._folder, key), data.as_buffer_like())

    def _write_in_place(self, path: str, data: Any) -> None:
        try:
            file = open(path, "wb")
        except FileNotFoundError:
            if not os.path.isdir(self._folder):
                raise  # the array itself is gone: never recreate it
            os.makedirs(os.path.dirname(path), exist_ok=True)  # "/"-separated keys (schema 1)
            file = open(path, "wb")
        with file:
            file.write(data)


def read(array: zarr.Array, selection: Any, *, rows: Sequence[int] | None = None,
         step_of: StepOf | None = None, orthogonal: bool = False) -> np.ndarray:
    """``array[selection]``, with a damaged chunk raised as StoreDamaged.

    ``rows``: the snapshot rows the selection covers (to name the damaged one), None for W_0.
    """
    try:
        return array.oindex[selection] if orthogonal else array[selection]
    except (ValueError, RuntimeError) as exc:
        if isinstance(exc, IndexError | zarr.errors.BaseZarrError):
            raise
        raise _damaged_row(array, rows, step_of, exc) from None


def require_chunks(array: zarr.Array, rows: int, step_of: StepOf | None = None) -> None:
    """Raise StoreDamaged if a chunk holding any of the first ``rows`` snapshot rows is
    missing."""
    chunk = array.chunks[0]
    for first in range(0, rows, chunk):
        coords = (first // chunk,) + (0,) * (array.ndim - 1)
        if not chunk_exists(array, coords):
            raise missing(array, first, step_of)


def require_whole(array: zarr.Array) -> None:
    """Raise StoreDamaged if the single chunk of ``array`` (W_0) is missing."""
    if not chunk_exists(array, (0,) * array.ndim):
        raise missing(array, None)


def check_fill_rows(array: zarr.Array, values: np.ndarray, rows: Sequence[int],
                    step_of: StepOf | None = None) -> None:
    """``values`` (len(rows), ...) were read from one-row chunks: raise StoreDamaged if a row
    that reads as the fill value (NaN) has no chunk behind it. Cheap: only rows whose first
    entry is NaN are looked up."""
    flat = values.reshape(len(rows), -1)
    for row, first in zip(rows, flat[:, 0]):
        if np.isnan(first) and not chunk_exists(array, (row,) + (0,) * (array.ndim - 1)):
            raise missing(array, row, step_of)


def chunk_exists(array: zarr.Array, chunk_coords: tuple[int, ...]) -> bool:
    key = array.metadata.encode_chunk_key(chunk_coords)
    return bool(sync((array.store_path / key).exists()))


def missing(array: zarr.Array, row: int | None, step_of: StepOf | None = None) -> StoreDamaged:
    where = _where(array, row, step_of)
    return StoreDamaged(f"{store_name(array)}: {where}: chunk missing (deleted or never "
                        "written); run `spectra verify` on the store",
                        array=array.path, snapshot=row, step=_step(row, step_of),
                        reason="missing")


def _damaged_row(array: zarr.Array, rows: Sequence[int] | None, step_of: StepOf | None,
                 exc: Exception) -> StoreDamaged:
    """Find the first row whose chunk fails to decode (re-reading one row at a time)."""
    bad = None
    for row in rows or ():
        try:
            array[row]
        except (ValueError, RuntimeError):
            bad = row
            break
    where = _where(array, bad, step_of)
    return StoreDamaged(f"{store_name(array)}: {where}: damaged chunk ({_reason(exc)}); run "
                        "`spectra verify` on the store", array=array.path, snapshot=bad,
                        step=_step(bad, step_of), reason="damaged")


def _chunk_selection(array: zarr.Array, chunk_coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c * size, min((c + 1) * size, extent))
                 for c, size, extent in zip(chunk_coords, array.chunks, array.shape))


def _where(array: zarr.Array, row: int | None, step_of: StepOf | None) -> str:
    if row is None:
        return array.path
    if array.chunks[0] > 1:
        last = row + array.chunks[0] - 1
        return f"{array.path}, snapshots {row}..{last}"
    step = _step(row, step_of)
    return f"{array.path}, snapshot {row}" + ("" if step is None else f" (step {step})")


def _step(row: int | None, step_of: StepOf | None) -> int | None:
    return None if row is None or step_of is None else step_of(row)


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "checksum mismatch" if "checksum" in text.lower() else text[:120]


def store_name(array: zarr.Array) -> str:
    """The store's path (local) or URL (fsspec), for messages."""
    store = array.store_path.store
    if getattr(store, "root", None) is not None:
        return str(store.root)
    return store.fs.unstrip_protocol(store.path) if hasattr(store, "fs") else str(store)
