"""Figures of runs from analyze() frames (never from a store): rank curves, singular-value
trajectories, stability heatmaps and run comparisons. Each function returns a matplotlib
Figure; ``save`` writes it as PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm

from spectra.core.metric_table import labels

TARGET_COLORS = {"updates": "tab:red", "weights": "tab:blue"}
LABELS = labels()  # metric name → axis label, from the metric table


def rank_curves(frame: pd.DataFrame, metric: str = "effective_rank",
                params: Sequence[str] | None = None, *, logx: bool = True) -> plt.Figure:
    """One panel per matrix: ``metric`` over steps for ΔW_t (updates) and W_t (weights).
    ΔW_0 = 0 is not drawn (its rank is 0 by definition)."""
    data = _without_initial_update(_select(frame, metric=metric, params=params))
    names = _params(data)
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        for target, part in data[data["param"] == name].groupby("target", observed=True):
            ax.plot(part["step"], part["value"], color=TARGET_COLORS.get(target), label=target)
        _style(ax, name, logx)
    axes[0].legend(title="ΔW_t vs W_t", fontsize=7)
    fig.supylabel(LABELS.get(metric, metric))
    fig.supxlabel("step")
    return fig


def singular_values(frame: pd.DataFrame, target: str = "updates",
                    params: Sequence[str] | None = None, *, logx: bool = True) -> plt.Figure:
    """One panel per matrix: its top singular values (sigma_i rows) over steps."""
    data = _select(frame, target=target, params=params)
    data = data[data["metric"].astype(str).str.startswith("sigma_")]
    names = _params(data)
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        part = data[data["param"] == name]
        for metric, line in part.groupby("metric", observed=True):
            i = int(str(metric).split("_")[1])
            ax.plot(line["step"], line["value"], color=plt.cm.viridis(min(1.0, (i - 1) / 8)),
                    label=f"σ{i}")
        _style(ax, name, logx)
    axes[0].legend(fontsize=6, ncol=2)
    fig.supylabel(f"singular values of {'ΔW_t' if target == 'updates' else 'W_t'}")
    fig.supxlabel("step")
    return fig


def stability_heatmap(frame: pd.DataFrame, metric: str = "oialr_stability_prev",
                      target: str = "weights") -> plt.Figure:
    """Layers × steps heatmap of 1 − stability on a log colour scale (the OIALR paper's figure,
    which saturates near 1 at small scale: the distance from 1 is what moves).

    Cells sit at their steps on the step axis (symlog, like the other figures). A "vs previous"
    metric compares two snapshots, so its cell spans the steps from the previous snapshot to
    its own: an extra snapshot one step after another draws a one-step sliver, not a column as
    wide as a hundred-step gap. Any other metric's cell is centred on its snapshot. A cell
    narrower than a tenth of a neighbour (a snapshot forced one step after a scheduled one) is
    merged into the cell before it: drawn, it would be a hairline of a one-step change, pale
    against its neighbours, and its tiny value would stretch the colour scale.
    """
    data = _select(frame, metric=metric, target=target)
    steps = np.sort(data["step"].unique())
    table = data.pivot_table(index="param", columns="step", values="value", observed=True,
                             dropna=False).reindex(columns=steps)
    steps = steps.astype(float)
    table = table.reindex([p for p in _params(data) if p in table.index])
    interval = metric.endswith("_prev")
    if interval:  # the first snapshot has no previous one
        table, edges = table.iloc[:, 1:], steps
    else:
        edges = _centred_edges(steps)
    edges, distance = _without_slivers(edges, (1.0 - table.to_numpy(dtype=float)).clip(min=1e-12))
    finite = distance[np.isfinite(distance)]
    if not finite.size:
        raise ValueError(f"no finite {metric!r} of {target} to draw (a 'vs previous' metric "
                         "needs at least two snapshots)")
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.3 * len(table)), constrained_layout=True)
    mesh = ax.pcolormesh(edges, np.arange(len(table) + 1), np.ma.masked_invalid(distance),
                         cmap="magma_r", norm=LogNorm(vmin=finite.min(),
                                                      vmax=max(finite.max(), 1.01 * finite.min())))
    fig.colorbar(mesh, ax=ax, label=f"1 − {LABELS.get(metric, metric)}")
    ax.set_yticks(np.arange(len(table)) + 0.5, [str(p) for p in table.index], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1, linscale=0.3)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("step" + (" (each cell: from the previous snapshot to its own)" if interval
                            else ""))
    ax.set_title(f"{LABELS.get(metric, metric)} of {target}", fontsize=9)
    return fig


def compare_runs(frames: Mapping[str, pd.DataFrame], metric: str = "effective_rank",
                 target: str = "updates", params: Sequence[str] | None = None, *,
                 logx: bool = True) -> plt.Figure:
    """Several runs on one figure: one panel per matrix (those the runs share), one line per run
    (keyed by ``frames``' keys: unique labels, e.g. from ``run_labels``). ΔW_0 = 0 is not drawn."""
    parts = [_without_initial_update(_select(f, metric=metric, target=target, params=params))
             .assign(run=name) for name, f in frames.items()]
    data = pd.concat(parts, ignore_index=True)
    shared = set.intersection(*(set(p["param"].astype(str)) for p in parts))
    names = [p for p in _params(data) if p in shared]
    if not names:
        raise ValueError(f"the runs {list(frames)} share no matrix with metric {metric!r}")
    fig, axes = _grid(len(names))
    colors = dict(zip(frames, sns.color_palette("tab10", len(frames))))
    for ax, name in zip(axes, names):
        for run, line in data[data["param"] == name].groupby("run"):
            ax.plot(line["step"], line["value"], color=colors[run], label=run)
        _style(ax, name, logx)
    axes[0].legend(fontsize=7)
    fig.supylabel(f"{LABELS.get(metric, metric)} of {'ΔW_t' if target == 'updates' else 'W_t'}")
    fig.supxlabel("step")
    return fig


def run_figures(frame: pd.DataFrame, out: str | Path, prefix: str) -> list[Path]:
    """The standard figures of one run into ``out``: ``<prefix>-ranks.png`` (effective rank of
    ΔW_t and W_t), ``<prefix>-singular-values.png`` (top σ of ΔW_t) and, when the frame has
    subspace metrics of at least two snapshots, ``<prefix>-stability.png`` (OIALR stability
    heatmap of W_t)."""
    out = Path(out)
    written = [save(rank_curves(frame), out / f"{prefix}-ranks.png"),
               save(singular_values(frame), out / f"{prefix}-singular-values.png")]
    stability = frame.loc[frame["metric"] == "oialr_stability_prev", "value"]
    if np.isfinite(stability.to_numpy(dtype=float)).any():
        written.append(save(stability_heatmap(frame), out / f"{prefix}-stability.png"))
    return written


def save(fig: plt.Figure, path: str | Path, dpi: int = 90) -> Path:
    """Write ``fig`` as PNG (or the format ``path``'s suffix names) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _select(frame: pd.DataFrame, *, metric: str | None = None, target: str | None = None,
            params: Sequence[str] | None = None) -> pd.DataFrame:
    data = frame
    if metric is not None:
        data = data[data["metric"] == metric]
    if target is not None:
        data = data[data["target"] == target]
    if params is not None:
        data = data[data["param"].isin(list(params))]
    if data.empty:
        raise ValueError(f"the frame has no rows for metric={metric!r}, target={target!r}, "
                         f"params={params!r}; metrics present: "
                         f"{sorted(map(str, frame['metric'].unique()))[:12]}")
    return data.sort_values("step", kind="stable")


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short unique names for the runs stored at ``paths``, usable as legend entries and file
    name prefixes: each store's name without its suffix (``run`` for ``a/run.zarr``), preceded
    by as many of its folders as it takes to tell the runs apart (``a-run``, ``b-run``)."""
    resolved = [Path(p).resolve() for p in paths]
    repeated = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if repeated:
        raise ValueError(f"the same store is given more than once: {repeated}")
    parts = [(*p.relative_to(p.anchor).parent.parts, p.stem) for p in resolved]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["-".join(part[-depth:]) for part in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise AssertionError("distinct paths always have distinct suffixes")


def _without_initial_update(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` without ΔW_0 = W_0 − W_0 = 0 (the updates' first snapshot): its ranks and
    norms are 0 by definition, not a measurement."""
    return data[~((data["target"] == "updates") & (data["step"] == data["step"].min()))]


def _without_slivers(edges: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges (n + 1,) and values (rows, n) with every sliver — a cell narrower than a
    tenth of a neighbour, e.g. steps 250→251 between gaps of 50 — merged into the nearest wider
    cell before it (after it, for leading slivers), which then spans both."""
    widths = np.diff(edges)
    if not widths.size:
        return edges, values
    widest_neighbour = np.maximum(np.r_[0.0, widths[:-1]], np.r_[widths[1:], 0.0])
    kept = 10 * widths >= widest_neighbour
    owner = np.maximum.accumulate(np.where(kept, np.arange(len(kept)), -1))
    owner[owner < 0] = np.argmax(kept)
    starts = [np.flatnonzero(owner == column)[0] for column in np.flatnonzero(kept)]
    return np.r_[edges[starts], edges[-1]], values[:, kept]


def _centred_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges (len(steps) + 1,) halfway between consecutive steps, half a gap beyond the
    ends (one step for a single snapshot)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _params(data: pd.DataFrame) -> list[str]:
    """Matrix names present, in the frame's category order (model order for analyze() output)."""
    present = set(data["param"].astype(str))
    order = (data["param"].cat.categories if isinstance(data["param"].dtype, pd.CategoricalDtype)
             else pd.unique(data["param"]))
    return [str(p) for p in order if str(p) in present]


def _grid(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.1 * rows), squeeze=False,
                             sharex=True, constrained_layout=True)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    for ax in flat[max(0, count - cols):count]:  # last panel of each column: show its steps
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig, flat[:count]


def _style(ax: plt.Axes, title: str, logx: bool) -> None:
    ax.set_title(title.removesuffix(".weight"), fontsize=8)
    ax.tick_params(labelsize=7)
    if logx:
        ax.set_xscale("symlog", linthresh=1, linscale=0.3)
    ax.grid(alpha=0.3)
