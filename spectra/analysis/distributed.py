"""The analysis on a dask cluster: one chain of tasks per (matrix, target), one task per chunk of
snapshots.

Each task opens the store itself, reads its chunk and extends the cache under the entry's lock
(spectra.analysis.extend.extend_chunk), then hands the polar factor of its last snapshot to the
next task of its chain. Chains are independent, so a cluster runs as many at once as it has
worker threads. A task is safe to run twice: dask reruns the tasks of a worker that died, and a
rerun computes only what the cache still lacks. When the cache is in the caller's memory (a store
that cannot be written, no cache path) the tasks return their rows and the caller writes them.
"""

from __future__ import annotations

import functools
from typing import Any

from tqdm.auto import tqdm

from spectra.analysis.cache import AnalysisCache, open_cache
from spectra.analysis.chunks import Chunk, chunks
from spectra.analysis.extend import Job, Reader, chunk_rows, compute_rows, extend_chunk
from spectra.core.linalg import blas_threads
from spectra.store import Run, open_run


def extend_on_cluster(client: Any, run: Run, cache: AnalysisCache,
                      todo: dict[str, dict[str, int]], ks: dict[str, int], device: str,
                      max_bytes: int, threads: int | None, quiet: bool) -> None:
    """Extend the entries in ``todo`` (param → {target: first missing row}) on ``client``."""
    from distributed import as_completed

    where = (str(run.location), run.attrs.get("created_unix"),
             str(cache.location) if cache.kind == "path" else None)
    returned: dict[Any, tuple[str, str, int]] = {}  # rows coming back → (param, target, start)
    finished = as_completed()
    count, previous = 0, None
    for param, starts in todo.items():
        job = Job(param, ks[param], device, max_bytes)
        for target, start in starts.items():
            previous = None
            for chunk in chunks(start, len(run), chunk_rows(run.shape(param), max_bytes)):
                previous = client.submit(_task, where, cache.shared, job, target, chunk,
                                         previous, threads, pure=False)
                if cache.shared:
                    finished.add(previous)
                else:
                    rows = client.submit(_rows_of, previous, pure=False)
                    returned[rows.key] = (param, target, chunk.start)
                    finished.add(rows)
                count += 1
    del previous  # hold no task's result: each is freed once the next task of its chain ran
    pending = _InOrder(cache, ks, len(run))
    for future in tqdm(finished, total=count, desc="analyze", disable=quiet, leave=False):
        if future.status == "error" or not cache.shared:
            result = future.result()  # raises the task's error here
            if not cache.shared:
                pending.add(*returned.pop(future.key), result)


def _task(where: tuple, shared: bool, job: Job, target: str, chunk: Chunk, previous: Any,
          threads: int | None) -> Any:
    """One chunk of one (matrix, target), on a worker. Returns the state for the next chunk, or
    (rows, state) when the cache lives in the caller's memory."""
    run, cache = _opened(*where, shared)
    run.refresh()
    state = previous[1] if isinstance(previous, tuple) else previous
    with blas_threads(threads):
        if not shared:
            return compute_rows(Reader(run, job.param), job, target, chunk.start, chunk.stop,
                                state)
        return extend_chunk(run, cache, job, [target], chunk, {target: state})[target]


@functools.lru_cache(maxsize=4)
def _opened(store: str, created: float | None, cache_path: str | None,
            shared: bool) -> tuple[Run, AnalysisCache | None]:
    """The store and its cache, opened once per worker process and analysis (``created`` tells
    a store from one made again at the same path)."""
    run = open_run(store)
    return run, open_cache(run, cache_path) if shared else None


def _rows_of(result: tuple) -> dict:
    return result[0]


class _InOrder:
    """Writes rows that come back in any order into a cache in memory, each entry in order."""

    def __init__(self, cache: AnalysisCache, ks: dict[str, int], length: int):
        self.cache, self.ks, self.length = cache, ks, length
        self.waiting: dict[tuple[str, str], dict[int, dict]] = {}

    def add(self, param: str, target: str, start: int, rows: dict) -> None:
        waiting = self.waiting.setdefault((param, target), {})
        waiting[start] = rows
        entry = self.cache.entry(target, param, self.ks[param])
        while entry.length in waiting:
            entry.append(entry.length, waiting.pop(entry.length), capacity=self.length)
