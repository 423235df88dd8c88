"""Extending the analysis cache: the SVDs of the snapshots a cache entry lacks, chunk by chunk.

The unit of work is one chunk of snapshots of one matrix, for one or both targets
(:func:`extend_chunk`): the serial analysis runs the chunks of a matrix in order with both
targets (reading each chunk of ΔW once), dask runs one chain of tasks per (matrix, target)
(spectra.analysis.distributed). A chunk carries the polar factor of its last snapshot to the next
one (:class:`State`), so the OIALR stability across a chunk boundary costs no second
decomposition; a chunk that starts without it (the first of a call, or after another process
extended the entry) decomposes its previous snapshot once.

Every chunk re-reads the entry's committed length under its lock and computes only rows that are
still missing, so a chunk is safe to run twice (a dask retry after a killed worker), next to other
processes extending the same entry, or after another process did it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra.analysis.cache import AnalysisCache
from spectra.analysis.chunks import Chunk
from spectra.core.series import Polar, series_svd
from spectra.store import Run


@dataclass(frozen=True)
class State:
    """The polar factor of snapshot ``row`` of one (target, param), for the next chunk."""

    row: int
    polar: Polar


@dataclass(frozen=True)
class Job:
    """What is extended: ``param``'s entries with top-k size ``k`` on ``device``."""

    param: str
    k: int
    device: str
    max_bytes: int


def chunk_rows(shape: tuple[int, int], max_bytes: int) -> int:
    """Snapshots per chunk: the matrices read (ΔW in float64, zarr's decoding buffer, W_t in
    float64 and at its storage precision: four float64 copies) within half of ``max_bytes``,
    at most 32; the SVD engine works within the other half."""
    return max(1, min(32, max_bytes // 2 // (8 * shape[0] * shape[1] * 4)))


def extend_chunk(run: Run, cache: AnalysisCache, job: Job, targets: list[str], chunk: Chunk,
                 states: dict[str, State | None]) -> dict[str, State | None]:
    """Cache the rows of ``chunk`` that ``targets``' entries of ``job.param`` lack; return the
    states for the next chunk (None for a target this chunk computed nothing for)."""
    reader = Reader(run, job.param)
    missing_state = any(states.get(target) is None for target in targets)
    reader.prefetch(chunk.first if job.k and missing_state else chunk.start, chunk.stop)
    out = {}
    for target in targets:
        with cache.lock(target, job.param, job.k):
            entry = cache.entry(target, job.param, job.k)
            length = entry.valid_length(run)
            if not chunk.start <= length < chunk.stop:  # done already, or behind this chunk
                out[target] = None  # (analyze() starts another round for an entry left behind)
                continue
            rows, out[target] = compute_rows(reader, job, target, length, chunk.stop,
                                             states.get(target))
            entry.append(length, rows, capacity=len(run))
    return out


def compute_rows(reader: "Reader", job: Job, target: str, begin: int, stop: int,
                 state: State | None) -> tuple[dict[str, np.ndarray], State | None]:
    """Cache rows [begin, stop) of (target, job.param) and the state after them."""
    previous = state.polar if state is not None and state.row == begin - 1 else None
    if job.k and begin > 0 and previous is None:  # decompose the previous snapshot once
        previous = series_svd(reader.matrices(target, begin - 1, begin), job.k,
                              device=job.device, threads=None).last
    svd = series_svd(reader.matrices(target, begin, stop), job.k, previous, device=job.device,
                     max_bytes=job.max_bytes // 2, threads=None)
    rows = {"snapshot": np.stack([reader.run.steps[begin:stop], reader.run.time[begin:stop]], 1),
            "sv": svd.S}
    if job.k:
        rows.update(u=svd.U, vh=svd.Vh, stability=svd.stability)
    last = State(stop - 1, svd.last) if svd.last is not None else None
    return rows, last


class Reader:
    """One matrix's snapshots as each target sees them; ΔW rows are read once for both targets."""

    def __init__(self, run: Run, param: str):
        self.run, self.param = run, param
        self._init = run.init(param)
        self._span: tuple[int, int] = (0, 0)
        self._updates: np.ndarray | None = None

    def matrices(self, target: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``target`` at the parameter's storage precision: W_t exactly
        (as Run.weights), ΔW_t rounded to it, so the engine picks its fastest method that is
        exact at that precision. (C, m, n)."""
        updates = self._read(start, stop)
        if target == "weights":
            return (self._init.astype(np.float64) + updates).astype(self._init.dtype)
        return updates.astype(self._init.dtype)

    def prefetch(self, start: int, stop: int) -> None:
        """Read ΔW rows [start, stop) now, for the calls that follow."""
        self._span = (start, stop)
        self._updates = self.run.updates(self.param, slice(start, stop))

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._updates is None or not self._span[0] <= start <= stop <= self._span[1]:
            self.prefetch(start, stop)
        first = self._span[0]
        return self._updates[start - first:stop - first]
