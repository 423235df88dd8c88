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

Only the SVDs are cached (in the store's ``analysis/`` group, see spectra.cache): a second call
computes SVDs only for snapshots committed since, also while a run is still being written.
Memory is bounded by one chunk of snapshots (``max_bytes``), not by the length of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spectra import metrics
from spectra.cache import AnalysisCache
from spectra.linalg import batched_svd
from spectra.store import Run, open_run

TARGETS = ("updates", "weights")
COLUMNS = ["step", "param", "target", "metric", "value"]


def analyze(store: str | Path | Run, *, targets: Iterable[str] = TARGETS, k: int = 8,
            params: Iterable[str] | None = None, device: str = "cpu", n_values: int = 8,
            tau: float = 0.9, alpha: float = 0.9, max_bytes: int = 256 * 2**20,
            quiet: bool = False) -> pd.DataFrame:
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
        quiet: no progress bar.

    Returns:
        long DataFrame with columns step (int64), param, target, metric (categoricals) and
        value (float64); ranks are counts stored as float (NaN for a NaN snapshot).
    """
    run = store if isinstance(store, Run) else open_run(store)
    run.refresh()
    targets = _validate(run, list(targets), k, n_values, tau, alpha)
    params = run.params if params is None else [run.spec(p).name for p in params]
    cache = AnalysisCache(run.path)
    frames = []
    jobs = [(target, param) for param in params for target in targets]
    for target, param in tqdm(jobs, desc="analyze", disable=quiet or not jobs, leave=False):
        _extend_cache(run, cache, target, param, k, device, max_bytes)
        entry = cache.entry(target, param, k)
        frames.append(_frame(run, entry, target, param, k, n_values, tau, alpha))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    frame["param"] = pd.Categorical(frame["param"], categories=params)  # model order
    for column in ("target", "metric"):
        frame[column] = frame[column].astype("category")
    return frame[COLUMNS]


def singular_values(store: str | Path | Run, param: str, target: str = "updates",
                    k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of ``param``'s ``target`` at every analysed snapshot.

    Returns (steps (T,), sv (T, min(m, n))) from the cache written by analyze(..., k=k).
    """
    run = store if isinstance(store, Run) else open_run(store)
    entry = AnalysisCache(run.path).entry(target, run.spec(param).name, k)
    if not entry:
        raise KeyError(f"no cached analysis of {target} of {param!r} with k={k}; run analyze() first")
    return run.steps[: len(entry["sv"])], entry["sv"]


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


def _extend_cache(run: Run, cache: AnalysisCache, target: str, param: str, k: int,
                  device: str, max_bytes: int) -> None:
    """SVD the snapshots committed since the cache was last extended, chunk by chunk."""
    start, total = cache.length(target, param, k), len(run)
    m, n = run.shape(param)
    per_matrix = 8 * m * n * 4  # the float64 matrix, its SVD factors and work space
    chunk = max(1, max_bytes // per_matrix)
    while start < total:
        stop = min(total, start + chunk)
        first = max(0, start - 1)  # re-read the previous snapshot: its basis anchors "prev"
        matrices = _read(run, target, param, slice(first, stop))
        if k == 0:
            sv = batched_svd(matrices, compute="values", device=device, max_bytes=max_bytes).S
            rows = {"sv": sv[start - first:]}
        else:
            svd = batched_svd(matrices, compute="full", device=device, max_bytes=max_bytes)
            stability = _pairwise_stability(svd.S, svd.U, svd.Vh)
            if start == 0:
                stability = np.concatenate([[np.nan], stability])
            skip = start - first
            rows = {"sv": svd.S[skip:], "u": svd.U[skip:, :, :k], "vh": svd.Vh[skip:, :k],
                    "stability": stability}
        cache.append(target, param, k, start, rows)
        start = stop


def _read(run: Run, target: str, param: str, rows: slice) -> np.ndarray:
    """(C, m, n) matrices at the parameter's own precision: W_t exactly; ΔW_t rounded to it
    (so the SVD engine picks its fastest method that is exact at that precision)."""
    dtype = run.init(param).dtype
    if target == "weights":
        return run.weights(param, rows)
    return run.updates(param, rows).astype(dtype)


def _pairwise_stability(s: np.ndarray, u: np.ndarray, vh: np.ndarray) -> np.ndarray:
    """OIALR full-basis stability between consecutive rows of a full SVD: (C−1,)."""
    values = metrics.oialr_stability(u[:-1], vh[:-1], u[1:], vh[1:])
    return np.where(_usable(s[:-1]) & _usable(s[1:]), values, np.nan)


def _usable(s: np.ndarray) -> np.ndarray:
    """Rows whose bases mean something: finite and not the zero matrix."""
    return np.isfinite(s).all(axis=-1) & (s[..., 0] > 0)


def _frame(run: Run, entry: dict[str, np.ndarray], target: str, param: str, k: int,
           n_values: int, tau: float, alpha: float) -> pd.DataFrame:
    sv = entry["sv"]
    steps = run.steps[: len(sv)]
    spec = run.spec(param)
    dtype = run.init(param).dtype
    columns = {
        "effective_rank": metrics.effective_rank(sv),
        "stable_rank": metrics.stable_rank(sv),
        "numerical_rank": metrics.numerical_rank(sv, shape=spec.shape, dtype=dtype),
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
        columns.update(_subspace_columns(entry, _usable(sv)))
    wide = pd.DataFrame({name: np.broadcast_to(np.asarray(v, dtype=np.float64), steps.shape)
                         for name, v in columns.items()})
    wide["step"] = steps
    frame = wide.melt(id_vars="step", var_name="metric", value_name="value")
    frame["param"], frame["target"] = param, target
    return frame


def _subspace_columns(entry: dict[str, np.ndarray], usable: np.ndarray) -> dict[str, np.ndarray]:
    """Comparisons of the top-k bases with the previous and with the last snapshot."""
    u, v = entry["u"], np.swapaxes(entry["vh"], -1, -2)
    out = {}
    prev_ok = np.concatenate([[False], usable[:-1] & usable[1:]])
    last_ok = usable & usable[-1]
    for suffix, (u_ref, v_ref, ok) in {
        "prev": (np.concatenate([u[:1], u[:-1]]), np.concatenate([v[:1], v[:-1]]), prev_ok),
        "last": (np.broadcast_to(u[-1], u.shape), np.broadcast_to(v[-1], v.shape), last_ok),
    }.items():
        values = {
            f"left_similarity_{suffix}": metrics.subspace_similarity(u_ref, u),
            f"right_similarity_{suffix}": metrics.subspace_similarity(v_ref, v),
            f"left_angle_{suffix}": metrics.largest_principal_angle(u_ref, u),
            f"right_angle_{suffix}": metrics.largest_principal_angle(v_ref, v),
            f"topk_stability_{suffix}": metrics.oialr_stability(
                u_ref, np.swapaxes(v_ref, -1, -2), u, entry["vh"]),
        }
        out.update({name: np.where(ok, value, np.nan) for name, value in values.items()})
        if suffix == "prev":
            out["oialr_stability_prev"] = entry["stability"]
    return out
