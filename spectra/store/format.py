"""The run store's format: schema constants, the matrix description, the errors, and the zarr
helpers that the reader, the writer and the checks share (layout: spectra/store/__init__.py)."""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from spectra.store.location import Location, PathOrURL

SCHEMA_VERSION = 2  # 2: crc32c on every chunk, digests, arrays grown ahead (docs/store.md)
UNCOMMITTED_STEP = -1
SERIES_CHUNK = 1024  # steps, time, digests, scalars: snapshots per chunk; arrays grow by this
UPDATE_DTYPES = ("float64", "float32")
# Measured on the demo GPT's ΔW (float64): lz4 + bitshuffle wrote 128 MB/s at 0.52 of raw size,
# zarr's default zstd(3) 69 MB/s at 0.59, no compression 166 MB/s at 1.0 (docs/store.md).
MATRIX_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)
CHECKSUM = Crc32cCodec()  # the last codec of every array: a damaged chunk fails to decode


class StoreError(ValueError):
    """A path that is not a usable spectra run store, or a store used inconsistently."""


class StoreDamaged(StoreError):
    """A chunk that is damaged (its checksum does not match) or missing.

    ``array``: its path in the store; ``snapshot``/``step``: the first snapshot it holds (None
    for W_0); ``reason``: "damaged" or "missing".
    """

    def __init__(self, message: str, *, array: str, snapshot: int | None, step: int | None,
                 reason: str):
        super().__init__(message)
        self.array, self.snapshot, self.step, self.reason = array, snapshot, step, reason


class StoreVanished(StoreError):
    """The store was deleted, moved or replaced while a writer held it."""


@dataclass(frozen=True)
class MatrixSpec:
    """What the store keeps about one recorded matrix.

    name: parameter name in the model (e.g. "blocks.0.mlp.fc.weight").
    shape: (m, n) of the stored matrix; conv kernels (out, in, k...) become (out, in·k...).
    original_shape: the parameter's own shape.
    kind: "linear", "conv", "embedding", "effective" (a module's dense effective weight) or "matrix".
    dtype: the parameter's dtype name ("float32", "bfloat16", ...): the precision the matrix was
        trained in, which numerical ranks are measured against. None when creating: that of W_0.
    attrs: further JSON-serialisable notes kept in the matrix's group attrs (e.g. ``tied_to``,
        ``layout``, ``adapter``: spectra.capture.rules).
    """

    name: str
    shape: tuple[int, int]
    original_shape: tuple[int, ...]
    kind: str
    dtype: str | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)


def open_zarr(location: PathOrURL | Location, mode: str) -> zarr.Group:
    """The zarr group at a path or URL, unconsolidated (mode "r", "r+", "a" or "w").

    Raises FileNotFoundError when nothing is there (modes "r", "r+").
    """
    location = Location.of(location)
    if mode in ("r", "r+") and not location.exists():
        raise FileNotFoundError(f"{location}: no such run store")
    store = location.zarr_store(read_only=mode == "r")
    return zarr.open_group(store=store, mode=mode, use_consolidated=False)


def open_root(location: PathOrURL | Location, mode: str) -> zarr.Group:
    """The root group of the run store at a path or URL ("r" or "r+"): the one way to open a
    store. Raises FileNotFoundError, or StoreError if it is not a spectra run store."""
    location = Location.of(location)
    try:
        root = open_zarr(location, mode)
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
            zarr.errors.ContainsArrayError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) and not location.exists():
            raise
        raise StoreError(f"{location}: not a spectra run store (not a zarr group: {exc})") from None
    meta = root.attrs.get("spectra")
    if not isinstance(meta, dict) or "schema" not in meta:
        raise StoreError(f"{location}: a zarr group but not a spectra run store "
                         "(attrs['spectra'] is missing)")
    if meta["schema"] > SCHEMA_VERSION:
        raise StoreError(f"{location}: store schema {meta['schema']} is newer than this spectra "
                         f"understands ({SCHEMA_VERSION}); upgrade spectra")
    return root


def is_run_store(location: PathOrURL | Location) -> bool:
    """True if ``location`` holds a spectra run store."""
    try:
        open_root(location, mode="r")
    except (FileNotFoundError, NotADirectoryError, StoreError):
        return False
    return True


SPEC_FIELDS = ("name", "shape", "original_shape", "kind", "dtype")


def read_spec(root: zarr.Group, name: str) -> MatrixSpec:
    group = root[f"params/{name}"]
    attrs = group.attrs
    dtype = attrs.get("dtype") or str(group["init"].dtype)  # stores before the dtype attr
    notes = {k: v for k, v in attrs.items() if k not in SPEC_FIELDS}
    return MatrixSpec(name=name, shape=tuple(attrs["shape"]),
                      original_shape=tuple(attrs["original_shape"]), kind=attrs["kind"],
                      dtype=dtype, attrs=notes)


def series_array(group: zarr.Group, name: str, dtype: Any, fill: Any, capacity: int,
                 columns: int | None = None) -> zarr.Array:
    """A per-snapshot array of ``capacity`` rows (1-D, or (rows, columns)), all ``fill``."""
    shape = (capacity,) if columns is None else (capacity, columns)
    chunks = (SERIES_CHUNK,) if columns is None else (SERIES_CHUNK, columns)
    dims = ("snapshot",) if columns is None else ("snapshot", "param")
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                              compressors=(CHECKSUM,), dimension_names=dims)


def series_arrays(root: zarr.Group) -> dict[str, zarr.Array]:
    """Every per-snapshot array but the matrices, by path: steps, time, digests, scalars/*."""
    arrays = {name: root[name] for name in ("steps", "time", "digests") if name in root}
    if "scalars" in root:
        arrays.update({f"scalars/{name}": array for name, array in root["scalars"].arrays()})
    return arrays


def resize(array: zarr.Array, rows: int) -> zarr.Array:
    """Set the number of snapshot rows, keeping chunk files beyond it (shrinking deletes no
    data: rows past the committed length are ignored, and overwritten when written again)."""
    shape = (rows, *array.shape[1:])
    if shape != array.shape:
        sync(array._async_array.resize(shape, delete_outside_chunks=False))
    return array


def digest(matrix: np.ndarray) -> int:
    """CRC-32 of the matrix's bytes (C order, dtype as given): equal for bitwise-equal
    matrices; zlib's reads the array in place (google_crc32c would need a copy)."""
    return zlib.crc32(np.ascontiguousarray(matrix))


def unknown_param_message(name: str, params: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, params, n=3)
    hint = f"; did you mean {close}?" if close else f"; recorded: {list(params)[:10]}"
    return f"no recorded matrix {name!r}{hint}"
