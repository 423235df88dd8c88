"""analyze(): a run store → per-layer, per-step spectral metrics as a tidy frame.

For every recorded matrix, every target ("updates": ΔW_t = W_t − W_0; "weights": W_t) and every
committed snapshot t, the frame holds the metrics of spectra.core.metric_table (names in the
``metric`` column): ranks, norms and the top singular values of each snapshot; with k > 0 the
top-k singular subspaces compared with the previous and with the last snapshot, and the OIALR
full-basis stability against the previous one. Pairwise metrics are NaN where either matrix is
zero (ΔW_0) or non-finite.

k is clamped to each matrix's smaller side (a 2-class head, a (1, d) token): ``frame.attrs["k"]``
says which k each matrix got. Only the SVDs are cached (spectra.analysis.cache): a second call
computes SVDs only for snapshots committed since, also while a run is still being written, and
several processes may analyze one store at once. Memory is bounded by one chunk of snapshots
(``max_bytes``), not by the length of the run. With ``client=`` (a dask.distributed Client) the
SVDs are computed on the cluster, one task per (matrix, target, chunk of snapshots); the frame is
the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spectra.analysis.cache import AnalysisCache, open_cache
from spectra.analysis.chunks import chunks
from spectra.analysis.columns import Options, entry_columns
from spectra.analysis.extend import Job, State, chunk_rows, extend_chunk
from spectra.core.linalg import blas_threads, compute_device
from spectra.store import Run, open_run

TARGETS = ("updates", "weights")
COLUMNS = ["step", "param", "target", "metric", "value"]
_ROUNDS = 3  # extension rounds before giving up on entries other processes keep cutting back


def analyze(store: str | Path | Run, *, targets: str | Iterable[str] = TARGETS, k: int = 8,
            params: str | Iterable[str] | None = None, device: str = "cpu", n_values: int = 8,
            tau: float = 0.9, alpha: float = 0.9, max_bytes: int = 256 * 2**20,
            threads: int | None = 1, quiet: bool = False, client: Any = None,
            cache: str | Path | None = None) -> pd.DataFrame:
    """Spectral metrics of every recorded matrix at every committed snapshot.

    Args:
        store: path of a run store, or an open Run.
        targets: "updates" (ΔW_t), "weights" (W_t), or both (a name or a list of names).
        k: size of the top singular subspaces compared between snapshots, clamped to each
            matrix's smaller side; 0 computes only the per-snapshot metrics (singular values
            alone, the cheapest SVD).
        params: matrices to analyse, a name or a list (default: all, in model order).
        device: "cpu" or "cuda" ("cuda:N") for the SVDs.
        n_values: how many top singular values to report as sigma_i rows.
        tau: explained-variance threshold; alpha: InRank explained-ratio threshold.
        max_bytes: memory budget for one chunk of snapshots (matrices read + SVD work), per
            process (per dask worker thread with ``client``).
        threads: BLAS threads while analysing (1, the measured best on a busy machine, see
            spectra.core.linalg; None leaves the process setting alone).
        quiet: no progress bar.
        client: a dask.distributed Client: compute the SVDs on its cluster (``pip install
            spectra-dynamics[dask]``; the workers must reach the store and the cache).
        cache: where the SVDs are cached: None = inside the store (in memory if the store
            cannot be written), a path of its own (a zarr group), or "memory" (this call only).

    Returns:
        long DataFrame with columns step (int64), param, target, metric (categoricals) and
        value (float64); ranks are counts stored as float (NaN for a NaN snapshot). Empty
        (same columns) when the store has no committed snapshot yet. ``attrs["k"]``: param → the
        k used for it.
    """
    run = store if isinstance(store, Run) else open_run(store)
    run.refresh()
    targets, params = _names(targets, "targets"), _names(params, "params")
    _validate(targets, k, n_values, tau, alpha, max_bytes, device, client)
    params = run.params if params is None else [run.spec(p).name for p in params]
    if not params:
        raise ValueError("params=[]: name at least one recorded matrix (or None for all)")
    ks = {param: min(k, *run.shape(param)) for param in params}
    parts = _FrameParts(params, targets)
    if len(run):
        store_cache = open_cache(run, cache)
        with blas_threads(threads):
            _complete(run, store_cache, targets, params, ks, str(device), max_bytes, threads,
                      client, quiet)
            options = Options(n_values, tau, alpha, rows=32)
            for param in params:
                for target in targets:
                    columns = entry_columns(run, store_cache, target, param, ks[param], options)
                    if columns is None:
                        raise RuntimeError(f"the cached analysis of {target} of {param!r} was "
                                           "cut back while it was read; run analyze() again")
                    parts.add(run.steps, param, target, columns)
    frame = parts.frame()
    frame.attrs["k"] = ks
    return frame


def singular_values(store: str | Path | Run, param: str, target: str = "updates", k: int = 8,
                    cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of ``param``'s ``target`` at every analysed snapshot.

    Returns (steps (T,), sv (T, min(m, n))) from the cache written by analyze(..., k=k).
    """
    run = store if isinstance(store, Run) else open_run(store)
    name = run.spec(param).name
    k = min(k, *run.shape(name))
    store_cache = open_cache(run, cache)
    with store_cache.lock(target, name, k):
        entry = store_cache.entry(target, name, k)
        length = entry.valid_length(run)
        if not length:
            raise KeyError(f"no cached analysis of {target} of {param!r} with k={k}; "
                           "run analyze() first")
        return run.steps[:length], entry.read("sv", 0, length)


def _names(value: str | Iterable[str] | None, argument: str) -> list[str] | None:
    """A name or an iterable of names as a list (a lone string is one name, not letters)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return [str(value)]
    names = list(value)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise ValueError(f"{argument}={value!r}: expected names (strings), got {bad[0]!r}")
    return names


def _validate(targets: list[str], k: Any, n_values: Any, tau: float, alpha: float,
              max_bytes: Any, device: Any, client: Any) -> None:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets={targets}; accepted: a non-empty subset of {TARGETS}")
    for name, value, low in (("k", k, 0), ("n_values", n_values, 0), ("max_bytes", max_bytes, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}; must be an int >= {low}")
    for name, value in (("tau", tau), ("alpha", alpha)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value}; must be in (0, 1)")
    compute_device(device)
    if client is not None and not callable(getattr(client, "submit", None)):
        raise ValueError(f"client={client!r}; expected a dask.distributed.Client")


def _complete(run: Run, cache: AnalysisCache, targets: list[str], params: list[str],
              ks: dict[str, int], device: str, max_bytes: int, threads: int | None, client: Any,
              quiet: bool) -> None:
    """Extend every entry to the run's committed length (in rounds: another process may cut an
    entry back while this one extends it)."""
    for _ in range(_ROUNDS):
        todo = _missing(run, cache, targets, params, ks)
        if not todo:
            return
        if client is None:
            _extend_serially(run, cache, todo, ks, device, max_bytes, quiet)
        else:
            from spectra.analysis.distributed import extend_on_cluster
            extend_on_cluster(client, run, cache, todo, ks, device, max_bytes, threads, quiet)
    if _missing(run, cache, targets, params, ks):
        raise RuntimeError(f"the analysis cache of {run.path} was cut back {_ROUNDS} times while "
                           "this call extended it; run analyze() again")


def _missing(run: Run, cache: AnalysisCache, targets: list[str], params: list[str],
             ks: dict[str, int]) -> dict[str, dict[str, int]]:
    """param → {target: first row its entry lacks}, for entries short of the run's length."""
    todo: dict[str, dict[str, int]] = {}
    for param in params:
        for target in targets:
            with cache.lock(target, param, ks[param]):
                length = cache.entry(target, param, ks[param]).valid_length(run)
            if length < len(run):
                todo.setdefault(param, {})[target] = length
    return todo


def _extend_serially(run: Run, cache: AnalysisCache, todo: dict[str, dict[str, int]],
                     ks: dict[str, int], device: str, max_bytes: int, quiet: bool) -> None:
    """Each matrix in order, chunk by chunk, both targets per chunk (ΔW read once)."""
    for param in tqdm(todo, desc="analyze", disable=quiet, leave=False):
        job = Job(param, ks[param], device, max_bytes)
        targets = list(todo[param])
        states: dict[str, State | None] = {}
        size = chunk_rows(run.shape(param), max_bytes)
        for chunk in chunks(min(todo[param].values()), len(run), size):
            states = extend_chunk(run, cache, job, targets, chunk, states)


class _FrameParts:
    """Accumulates metric columns as numpy arrays and category codes (about 20 bytes a row),
    and builds the long frame once at the end."""

    def __init__(self, params: list[str], targets: list[str]):
        self.params, self.targets = params, targets
        self.metrics: dict[str, int] = {}
        self.pieces: list[tuple[np.ndarray, ...]] = []

    def add(self, steps: np.ndarray, param: str, target: str,
            columns: dict[str, np.ndarray]) -> None:
        count = len(steps) * len(columns)
        codes = [self.metrics.setdefault(name, len(self.metrics)) for name in columns]
        values = np.concatenate([np.broadcast_to(np.asarray(v, dtype=np.float64), steps.shape)
                                 for v in columns.values()])
        self.pieces.append((np.tile(steps, len(columns)),
                            np.full(count, self.params.index(param), np.int32),
                            np.full(count, self.targets.index(target), np.int8),
                            np.repeat(np.array(codes, np.int32), len(steps)), values))

    def frame(self) -> pd.DataFrame:
        empty = (np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int8),
                 np.empty(0, np.int32), np.empty(0))
        step, param, target, metric, value = (np.concatenate(c) for c in
                                              zip(empty, *self.pieces))
        return pd.DataFrame({
            "step": step.astype(np.int64),
            "param": pd.Categorical.from_codes(param, categories=self.params),
            "target": pd.Categorical.from_codes(target, categories=self.targets),
            "metric": pd.Categorical.from_codes(metric, categories=list(self.metrics)),
            "value": value,
        })[COLUMNS]

