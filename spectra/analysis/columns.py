"""The metric columns of one cached (target, matrix): every metric of spectra.core.metric_table
computed from the cache's singular values, top-k bases and stabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra.analysis.cache import AnalysisCache, Entry
from spectra.analysis.chunks import chunks
from spectra.core.metric_table import METRICS, Metric
from spectra.store import Run


@dataclass(frozen=True)
class Options:
    """The metrics' parameters: ``n_values`` sigma_i rows, τ, α, and rows per chunk of bases."""

    n_values: int
    tau: float
    alpha: float
    rows: int


def entry_columns(run: Run, cache: AnalysisCache, target: str, param: str, k: int,
                  options: Options) -> dict[str, np.ndarray] | None:
    """Metric name → (T,) float64 over the run's T committed snapshots, in table order; None
    if the cache does not hold all T of them (another process cut the entry back)."""
    with cache.lock(target, param, k):
        entry = cache.entry(target, param, k)
        length = len(run)
        if entry.valid_length(run) < length:
            return None
        sv = entry.read("sv", 0, length)
        usable = np.isfinite(sv).all(axis=-1) & (sv[:, 0] > 0)
        spec = run.spec(param)
        context = {"shape": spec.shape, "dtype": spec.dtype, "tau": options.tau,
                   "alpha": options.alpha}
        bases = _bases_columns(entry, length, usable, options.rows) if k else {}
        columns: dict[str, np.ndarray] = {}
        for metric in METRICS:
            if metric.reads == "values":
                columns.update(_values_columns(metric, sv, context, options.n_values))
            elif metric.reads == "polar" and k:
                columns[metric.names()[0]] = entry.read("stability", 0, length)
            elif metric.reads == "bases" and k:
                columns.update({name: bases[name] for name in metric.names()})
        return columns


def _values_columns(metric: Metric, sv: np.ndarray, context: dict,
                    n_values: int) -> dict[str, np.ndarray]:
    if metric.family:
        names = metric.names(min(n_values, sv.shape[1]))
        return {name: metric.function(sv, i + 1) for i, name in enumerate(names)}
    arguments = {name: context[name] for name in metric.arguments}
    return {metric.name: metric.function(sv, **arguments)}


def _bases_columns(entry: Entry, length: int, usable: np.ndarray,
                   rows: int) -> dict[str, np.ndarray]:
    """Every "bases" metric against the previous and the last snapshot, ``rows`` at a time."""
    table = [metric for metric in METRICS if metric.reads == "bases"]
    out = {name: np.full(length, np.nan) for metric in table for name in metric.names()}
    last = (entry.read("u", length - 1, length)[0], entry.read("vh", length - 1, length)[0])
    for chunk in chunks(0, length, rows):
        u, vh = entry.read("u", chunk.first, chunk.stop), entry.read("vh", chunk.first, chunk.stop)
        now = slice(chunk.start - chunk.first, None)
        for metric in table:
            if "prev" in metric.against and len(u) > 1:  # rows first+1 .. stop-1 vs the row before
                out[f"{metric.name}_prev"][chunk.first + 1:chunk.stop] = _compare(
                    metric, u[:-1], vh[:-1], u[1:], vh[1:])
            if "last" in metric.against:
                out[f"{metric.name}_last"][chunk.start:chunk.stop] = _compare(
                    metric, *last, u[now], vh[now])
    prev_ok = np.concatenate([[False], usable[:-1] & usable[1:]])
    last_ok = usable & usable[-1]
    return {name: np.where(prev_ok if name.endswith("_prev") else last_ok, values, np.nan)
            for name, values in out.items()}


def _compare(metric: Metric, u_ref: np.ndarray, vh_ref: np.ndarray, u: np.ndarray,
             vh: np.ndarray) -> np.ndarray:
    """``metric`` of top-k bases (C, m, k), (C, k, n) against references of the same shape (or
    one reference (m, k), (k, n) for all)."""
    if metric.side == "left":
        return metric.function(u_ref, u)
    if metric.side == "right":
        return metric.function(np.swapaxes(vh_ref, -1, -2), np.swapaxes(vh, -1, -2))
    return metric.function(u_ref, vh_ref, u, vh)
