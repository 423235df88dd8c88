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
    data = _select(frame, metric=metric, params=params)
    data = data[~((data["target"] == "updates") & (data["step"] == data["step"].min()))]
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
    which saturates near 1 at small scale: the distance from 1 is what moves)."""
    data = _select(frame, metric=metric, target=target).dropna(subset=["value"])
    table = data.pivot_table(index="param", columns="step", values="value", observed=True)
    table = table.reindex([p for p in _params(data) if p in table.index])
    distance = (1.0 - table).clip(lower=1e-12)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.25 * table.shape[1]), 1.2 + 0.3 * len(table)))
    finite = distance.to_numpy()[np.isfinite(distance.to_numpy())]
    norm = LogNorm(vmin=max(finite.min(), 1e-12), vmax=max(finite.max(), 1e-11)) if finite.size else None
    sns.heatmap(distance, ax=ax, cmap="magma_r", norm=norm,
                cbar_kws={"label": f"1 − {LABELS.get(metric, metric)}"})
    ax.set_xlabel("step")
    ax.set_ylabel("")
    ax.set_title(f"{LABELS.get(metric, metric)} of {target}")
    fig.tight_layout()
    return fig


def compare_runs(frames: Mapping[str, pd.DataFrame], metric: str = "effective_rank",
                 target: str = "updates", params: Sequence[str] | None = None, *,
                 logx: bool = True) -> plt.Figure:
    """Several runs on one figure: one panel per matrix (those the runs share), one line per run."""
    parts = [_select(f, metric=metric, target=target, params=params).assign(run=name)
             for name, f in frames.items()]
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
    subspace metrics, ``<prefix>-stability.png`` (OIALR stability heatmap of W_t)."""
    out = Path(out)
    written = [save(rank_curves(frame), out / f"{prefix}-ranks.png"),
               save(singular_values(frame), out / f"{prefix}-singular-values.png")]
    if (frame["metric"] == "oialr_stability_prev").any():
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
