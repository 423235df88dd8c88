"""analyze(): a run store → per-layer, per-step spectral metrics as a tidy frame.

For every recorded matrix, every target ("updates": ΔW_t = W_t − W_0; "weights": W_t) and every
committed snapshot t, the frame holds (metric names in the ``metric`` column):

per snapshot       effective_rank, stable_rank, numerical_rank, explained_variance_rank (τ),
                   inrank_rank (α), frobenius_norm, spectral_norm, nuclear_norm,
                   condition_number, sigma_1 ... sigma_<n_values>
vs the previous    left_similarity_prev, right_similarity_prev   ‖AᵀB‖²_F / k of top-k bases
snapshot (k > 0)   left_angle_prev, right_angle_prev              largest principal angle, rad
                   oialr_stability_prev    OIALR: mean cosine of matching columns of U·Vh,
                                           all min(m, n) columns (1 = basis unchanged)
                   topk_stability_prev     the same restricted to the top-k triplets
vs the last        left_similarity_last, right_similarity_last, left_angle_last,
snapshot (k > 0)   right_angle_last, topk_stability_last

Pairwise metrics are NaN where either matrix is zero (ΔW_0) or non-finite.

Only the SVDs are cached (in the store's ``analysis/`` group, see spectra.analysis.cache): a second call
computes SVDs only for snapshots committed since, also while a run is still being written.
Memory is bounded by one chunk of snapshots (``max_bytes``), not by the length of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spectra.core import metrics
from spectra.analysis.cache import AnalysisCache, Entry
from spectra.core.linalg import batched_svd, blas_threads
from spectra.store import Run, open_run

TARGETS = ("updates", "weights")
COLUMNS = ["step", "param", "target", "metric", "value"]


def analyze(store: str | Path | Run, *, targets: Iterable[str] = TARGETS, k: int = 8,
            params: Iterable[str] | None = None, device: str = "cpu", n_values: int = 8,
            tau: float = 0.9, alpha: float = 0.9, max_bytes: int = 64 * 2**20,
            threads: int | None = 1, quiet: bool = False) -> pd.DataFrame:
    """Spectral metrics of every recorded matrix at every committed snapshot.

    Args:
        store: path of a run store, or an open Run.
        targets: any of "updates" (ΔW_t) and "weights" (W_t).
        k: size of the top singular subspaces compared between snapshots; 0 computes only the
            per-snapshot metrics (singular values alone, the cheapest SVD).
        params: matrices to analyse (default: all, in model order).
        device: "cpu" or "cuda" for the SVDs.
        n_values: how many top singular values to report as sigma_i rows.
        tau: explained-variance threshold; alpha: InRank explained-ratio threshold.
        max_bytes: memory budget for one chunk of snapshots (matrices read + SVD work).
        threads: BLAS threads while analysing (1, the measured best on a busy machine, see
            spectra.core.linalg; None leaves the process setting alone).
        quiet: no progress bar.

    Returns:
        long DataFrame with columns step (int64), param, target, metric (categoricals) and
        value (float64); ranks are counts stored as float (NaN for a NaN snapshot).
    """
    run = store if isinstance(store, Run) else open_run(store)
    run.refresh()
    targets = _validate(run, list(targets), k, n_values, tau, alpha)
    params = run.params if params is None else [run.spec(p).name for p in params]
    if not params:
        raise ValueError("params=[]: name at least one recorded matrix (or None for all)")
    cache = AnalysisCache(run.path)
    parts = _FrameParts(params, targets)
    with blas_threads(threads):
        for param in tqdm(params, desc="analyze", disable=quiet or not params, leave=False):
            _extend_cache(run, cache, targets, param, k, device, max_bytes)
            for target in targets:
                entry = cache.entry(target, param, k)
                columns = _columns(run, entry, param, k, n_values, tau, alpha, max_bytes)
                parts.add(run.steps[: entry.length], param, target, columns)
    return parts.frame()


def singular_values(store: str | Path | Run, param: str, target: str = "updates",
                    k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of ``param``'s ``target`` at every analysed snapshot.

    Returns (steps (T,), sv (T, min(m, n))) from the cache written by analyze(..., k=k).
    """
    run = store if isinstance(store, Run) else open_run(store)
    entry = AnalysisCache(run.path).entry(target, run.spec(param).name, k)
    if not entry:
        raise KeyError(f"no cached analysis of {target} of {param!r} with k={k}; run analyze() first")
    return run.steps[: entry.length], entry.read("sv")


def _validate(run: Run, targets: list[str], k: int, n_values: int, tau: float,
              alpha: float) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets={targets}; accepted: a non-empty subset of {TARGETS}")
    smallest = min(min(run.shape(p)) for p in run.params)
    if not isinstance(k, int) or not 0 <= k <= smallest:
        raise ValueError(f"k={k!r}; must be an int in [0, {smallest}] (the smallest matrix side)")
    if not isinstance(n_values, int) or n_values < 0:
        raise ValueError(f"n_values={n_values!r}; must be a non-negative int")
    for name, value in (("tau", tau), ("alpha", alpha)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value}; must be in (0, 1)")
    return targets


_MAX_CHUNK = 32  # snapshots; more buys nothing on a CPU, where a batched SVD is a loop


def _chunk_rows(shape: tuple[int, int], max_bytes: int) -> int:
    """Snapshots per chunk: about six float64 copies of each matrix (ΔW read, W_t, the
    engine's copy, U, Vh, work space) within ``max_bytes``, and at most _MAX_CHUNK."""
    return max(1, min(_MAX_CHUNK, max_bytes // (8 * shape[0] * shape[1] * 6)))


def _extend_cache(run: Run, cache: AnalysisCache, targets: list[str], param: str, k: int,
                  device: str, max_bytes: int) -> None:
    """SVD the snapshots committed since each target's cache was last extended, chunk by chunk,
    reading each chunk of ΔW once for all targets."""
    starts = {target: cache.entry(target, param, k).length for target in targets}
    total = len(run)
    dtype = run.init(param).dtype
    init = run.init(param).astype(np.float64)
    chunk = _chunk_rows(run.shape(param), max_bytes)
    for start in range(min(starts.values()), total, chunk):
        stop = min(total, start + chunk)
        first = max(0, start - 1)  # the previous snapshot too: its basis anchors "prev"
        updates = run.updates(param, slice(first, stop))
        for target in targets:
            begin = max(start, starts[target])
            if begin >= stop:
                continue
            rows = slice(max(0, begin - 1) - first, stop - first)
            # at the parameter's own precision: W_t exactly (as Run.weights), ΔW_t rounded to it,
            # so the SVD engine picks its fastest method that is exact at that precision
            matrices = (init + updates[rows] if target == "weights" else updates[rows]).astype(dtype)
            cache.append(target, param, k, begin, _svd_rows(matrices, begin, k, device, max_bytes))


def _svd_rows(matrices: np.ndarray, begin: int, k: int, device: str,
              max_bytes: int) -> dict[str, np.ndarray]:
    """Cache rows for snapshots begin.. from ``matrices`` (C, m, n), which start one snapshot
    earlier unless ``begin`` is 0."""
    skip = 1 if begin else 0
    if k == 0:
        return {"sv": batched_svd(matrices, compute="values", device=device,
                                  max_bytes=max_bytes, threads=None).S[skip:]}
    svd = batched_svd(matrices, compute="full", device=device, max_bytes=max_bytes, threads=None)
    stability = _pairwise_stability(svd.S, svd.U, svd.Vh)
    if not begin:
        stability = np.concatenate([[np.nan], stability])
    return {"sv": svd.S[skip:], "u": svd.U[skip:, :, :k], "vh": svd.Vh[skip:, :k],
            "stability": stability}


def _pairwise_stability(s: np.ndarray, u: np.ndarray, vh: np.ndarray) -> np.ndarray:
    """OIALR full-basis stability between consecutive rows of a full SVD: (C−1,)."""
    values = metrics.oialr_stability(u[:-1], vh[:-1], u[1:], vh[1:])
    return np.where(_usable(s[:-1]) & _usable(s[1:]), values, np.nan)


def _usable(s: np.ndarray) -> np.ndarray:
    """Rows whose bases mean something: finite and not the zero matrix."""
    return np.isfinite(s).all(axis=-1) & (s[..., 0] > 0)


def _columns(run: Run, entry: Entry, param: str, k: int, n_values: int, tau: float,
             alpha: float, max_bytes: int) -> dict[str, np.ndarray]:
    """Every metric of one (target, param) over its cached snapshots: name → (T,)."""
    sv = entry.read("sv")
    spec = run.spec(param)
    columns = {
        "effective_rank": metrics.effective_rank(sv),
        "stable_rank": metrics.stable_rank(sv),
        "numerical_rank": metrics.numerical_rank(sv, shape=spec.shape, dtype=run.init(param).dtype),
        "explained_variance_rank": metrics.explained_variance_rank(sv, tau),
        "inrank_rank": metrics.inrank_rank(sv, alpha),
        "frobenius_norm": metrics.frobenius_norm(sv),
        "spectral_norm": metrics.spectral_norm(sv),
        "nuclear_norm": metrics.nuclear_norm(sv),
        "condition_number": metrics.condition_number(sv),
    }
    for i in range(min(n_values, sv.shape[1])):
        columns[f"sigma_{i + 1}"] = sv[:, i]
    if k > 0:
        columns.update(_subspace_columns(entry, _usable(sv), _chunk_rows(spec.shape, max_bytes)))
    return columns


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
        step, param, target, metric, value = (np.concatenate(c) for c in zip(*self.pieces))
        return pd.DataFrame({
            "step": step,
            "param": pd.Categorical.from_codes(param, categories=self.params),
            "target": pd.Categorical.from_codes(target, categories=self.targets),
            "metric": pd.Categorical.from_codes(metric, categories=list(self.metrics)),
            "value": value,
        })[COLUMNS]


def _subspace_columns(entry: Entry, usable: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    """Top-k bases compared with the previous and with the last snapshot, ``rows`` at a time."""
    length = entry.length
    last = (entry.read("u", length - 1), entry.read("vh", length - 1))
    out: dict[str, np.ndarray] = {}
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        first = max(0, start - 1)  # one row back: the previous snapshot of the chunk's first
        u, vh = entry.read("u", first, stop), entry.read("vh", first, stop)
        paired = max(start, 1)  # rows compared with their previous snapshot
        now = slice(paired - first, stop - first)
        before = slice(paired - 1 - first, stop - 1 - first)
        comparisons = (("prev", paired, _compare(u[before], vh[before], u[now], vh[now])),
                       ("last", start, _compare(*last, u[start - first:], vh[start - first:])))
        for suffix, begin, values in comparisons:
            for name, value in values.items():
                out.setdefault(f"{name}_{suffix}", np.full(length, np.nan))[begin:stop] = value
    prev_ok = np.concatenate([[False], usable[:-1] & usable[1:]])
    last_ok = usable & usable[-1]
    for name in out:
        out[name] = np.where(prev_ok if name.endswith("_prev") else last_ok, out[name], np.nan)
    out["oialr_stability_prev"] = entry.read("stability")
    return out


def _compare(u_ref: np.ndarray, vh_ref: np.ndarray, u: np.ndarray,
             vh: np.ndarray) -> dict[str, np.ndarray]:
    """Subspace metrics of top-k bases (C, m, k), (C, k, n) against references of the same
    shape (or one reference (m, k), (k, n) for all)."""
    v_ref, v = np.swapaxes(vh_ref, -1, -2), np.swapaxes(vh, -1, -2)
    return {
        "left_similarity": metrics.subspace_similarity(u_ref, u),
        "right_similarity": metrics.subspace_similarity(v_ref, v),
        "left_angle": metrics.largest_principal_angle(u_ref, u),
        "right_angle": metrics.largest_principal_angle(v_ref, v),
        "topk_stability": metrics.oialr_stability(u_ref, vh_ref, u, vh),
    }
