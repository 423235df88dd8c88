"""Figures of the theory suite, drawn from the frames of spectra.methods.theory.report.

- ``modes_figure``: singular values of W_t − W_0 with the closed-form mode curves (left), the
  loss with its predicted plateaus (right).
- ``sweep_figure``: the init-scale sweep: staircase separation, t_50 and alignment against α.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def modes_figure(frame: pd.DataFrame) -> plt.Figure:
    """From ``modes_frame(run)``: σ_j(W_t − W_0) of the product (solid; the teacher's modes in
    colour, the rest grey) and the closed form (dashed); the loss and the plateaus (dotted)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    rank = frame.attrs["teacher_rank"]
    colors = plt.cm.viridis(np.linspace(0, 0.85, rank))
    sigma = frame[frame["series"] == "sigma"]
    for j, line in sigma[sigma["source"] == "measured"].groupby("index"):
        teacher_mode = j <= rank
        left.plot(line["step"], line["value"], color=colors[j - 1] if teacher_mode else "0.7",
                  lw=1.6, label=f"σ{j}(ΔW)" if teacher_mode else None)
    closed = sigma[sigma["source"] == "closed form"]
    for i, (_, line) in enumerate(closed.groupby("index")):
        left.plot(line["step"], line["value"], "--", color="k", lw=0.9,
                  label="closed form" if i == 0 else None)
    left.axhline(frame.attrs["s_min"] / 2, color="tab:red", lw=0.7, ls=":", label="s_min / 2")
    left.set_ylabel("singular values of W_t − W_0")
    loss = frame[frame["series"] == "loss"]
    right.plot(loss["step"], loss["value"], color="tab:blue")
    for level in frame.loc[frame["series"] == "plateau", "value"]:
        right.axhline(level, color="0.5", lw=0.7, ls=":")
    right.set_yscale("log")
    right.set_ylabel("loss ½‖W_t − T‖² (dotted: plateaus)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(frame.attrs["title"], fontsize=9)
    return fig


def sweep_figure(frame: pd.DataFrame) -> plt.Figure:
    """From ``sweep_frame(runs)``: measured (markers) and predicted (lines) staircase
    separation and t_50 per mode against α; the largest alignment angle at t_50,k."""
    fig, (sep, t50, angle) = plt.subplots(1, 3, figsize=(11, 3.3), constrained_layout=True)

    def part(quantity: str, source: str, mode: int | None = None) -> pd.DataFrame:
        rows = frame[(frame["quantity"] == quantity) & (frame["source"] == source)]
        return rows if mode is None else rows[rows["mode"] == mode]

    predicted, measured = part("separation", "predicted"), part("separation", "measured")
    sep.plot(predicted["alpha"], predicted["value"], "-", color="0.4", label="predicted")
    sep.plot(measured["alpha"], measured["value"], "o", color="tab:red", label="measured")
    sep.axhline(1.0, color="k", lw=0.7, ls=":")
    sep.set_ylabel("min t10,i+1 / t90,i")
    sep.legend(fontsize=7)
    s = frame.attrs["s"]
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(s)))
    for i, value in enumerate(s):
        line, dots = part("t50", "predicted", i + 1), part("t50", "measured", i + 1)
        t50.plot(line["alpha"], line["value"], "-", color=colors[i], lw=1)
        t50.plot(dots["alpha"], dots["value"], "o", color=colors[i], ms=4, label=f"s = {value:g}")
    weakest = part("t50", "predicted", len(s))
    alphas = weakest["alpha"].to_numpy()
    t50.plot(alphas, weakest["value"].iloc[0] * alphas[0] / alphas, ":", color="k", lw=0.8,
             label="∝ 1/α")
    t50.set_yscale("log")
    t50.set_ylabel("t50 (steps)")
    t50.legend(fontsize=7)
    angles = part("angle", "measured")
    angle.plot(angles["alpha"], angles["value"], "o-", color="tab:purple")
    angle.set_ylabel("angle to teacher at t50,k (°)")
    for ax in (sep, t50, angle):
        ax.set_xscale("log")
        ax.set_xlabel("init scale α")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(frame.attrs["title"], fontsize=9)
    return fig
