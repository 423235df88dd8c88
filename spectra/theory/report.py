"""The suite's faces: the table of checks (text and CSV) and its two figures.

- ``format_table``: a Markdown table (check, setting, measured, predicted, result, theory).
- ``write_table``: the same rows as CSV, with the numbers behind each row as JSON.
- ``modes_figure``: singular values of W_t − W_0 over steps with the closed-form mode curves
  overlaid, and the loss with the predicted plateaus.
- ``sweep_figure``: the init-scale sweep: staircase separation, t_50 and alignment against α.
- ``write_outputs``: all of them for a suite result, into one folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spectra.plot import save  # noqa: E402
from spectra.theory import checks  # noqa: E402
from spectra.theory.checks import CheckResult  # noqa: E402
from spectra.theory.closed_forms import mode_trajectory, plateau_losses  # noqa: E402
from spectra.theory.measure import Trajectory  # noqa: E402
from spectra.theory.suite import SuiteResult  # noqa: E402

_EXPECTED = {True: "holds", False: "breaks", None: "no claim"}


def write_outputs(result: SuiteResult, folder: str | Path) -> str:
    """Write theory-checks.csv, theory-modes-d<D>.png (main run and its other-depth twin) and
    theory-sweep.png into ``folder``; return the table and the list of files as text."""
    folder = Path(folder)
    files = [write_table(result.rows, folder / "theory-checks.csv")]
    for run in (result.main, result.companion):
        files.append(save(modes_figure(run), folder / f"theory-modes-d{run.setting.depth}.png"))
    files.append(save(sweep_figure(result.sweep), folder / "theory-sweep.png"))
    listing = "\n".join(f"wrote {path}" for path in files)
    return (f"{format_table(result.rows)}\n{len(result.runs)} runs recorded and checked in "
            f"{result.seconds:.0f} s (stores in {folder})\n{listing}")


def format_table(rows: Sequence[CheckResult]) -> str:
    """Markdown table of the rows, then a line counting agreements with theory."""
    lines = ["| check | setting | measured | predicted | result | theory |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.check} | {row.setting} | {row.measured} | {row.predicted} | "
                     f"{'pass' if row.passed else 'FAIL'} | {_EXPECTED[row.expected]} |")
    claims = [row for row in rows if row.expected is not None]
    agree = sum(bool(row.agrees) for row in claims)
    lines.append(f"\n{agree} of {len(claims)} outcomes are the ones theory predicts "
                 f"({len(rows) - len(claims)} without a claim).")
    return "\n".join(lines)


def write_table(rows: Sequence[CheckResult], path: str | Path) -> Path:
    """Write the rows as CSV (``values``: the row's numbers as JSON). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{"check": row.check, "setting": row.setting, "measured": row.measured,
                           "predicted": row.predicted, "passed": row.passed,
                           "expected": _EXPECTED[row.expected], "agrees": row.agrees,
                           "values": json.dumps(row.values)} for row in rows])
    frame.to_csv(path, index=False)
    return path


def modes_figure(run: Trajectory) -> plt.Figure:
    """Left: σ_j(W_t − W_0) of the product (solid) and the closed-form m_i(t) − m_i(0)
    (dashed, gradient descent only). Right: the loss and the predicted plateaus ½Σ_{j>k} s_j²."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    steps = run.steps
    shown = steps > 0
    colors = plt.cm.viridis(np.linspace(0, 0.85, run.teacher.rank))
    for j in range(run.update_sv.shape[1]):
        color = colors[j] if j < run.teacher.rank else "0.7"
        left.plot(steps[shown], run.update_sv[shown, j], color=color, lw=1.6,
                  label=f"σ{j + 1}(ΔW)" if j < run.teacher.rank else None)
    if run.setting.optimizer != "adam":
        grid = np.geomspace(max(1, steps[shown][0]), steps[-1], 300)
        setting = run.setting
        for i, (s, m0) in enumerate(zip(run.s, run.m0)):
            curve = mode_trajectory(np.concatenate([[0.0], grid]), s, m0, setting.alpha,
                                    setting.depth, setting.tau)[1:]
            left.plot(grid, curve - m0, "--", color="k", lw=0.9,
                      label="closed form" if i == 0 else None)
    left.axhline(run.s[-1] / 2, color="tab:red", lw=0.7, ls=":", label="s_min / 2")
    left.set_ylabel("singular values of W_t − W_0")
    right.plot(steps[shown], run.loss[shown], color="tab:blue")
    for level in plateau_losses(run.s):
        right.axhline(level, color="0.5", lw=0.7, ls=":")
    right.set_yscale("log")
    right.set_ylabel("loss ½‖W_t − T‖² (dotted: plateaus)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"{checks.label(run.setting)}, teacher s = {', '.join(f'{s:g}' for s in run.s)}",
                 fontsize=9)
    return fig


def sweep_figure(runs: Sequence[Trajectory]) -> plt.Figure:
    """The init-scale sweep (runs differing in α): measured (markers) and predicted (lines)
    staircase separation and t_50 per mode; largest alignment angle at t_50,k."""
    runs = sorted(runs, key=lambda run: run.setting.alpha)
    alphas = np.array([run.setting.alpha for run in runs])
    fig, (sep, t50, angle) = plt.subplots(1, 3, figsize=(11, 3.3), constrained_layout=True)
    sep.plot(alphas, [checks.separation(run, predicted=True) for run in runs], "-",
             color="0.4", label="predicted")
    sep.plot(alphas, [checks.separation(run) for run in runs], "o", color="tab:red",
             label="measured")
    sep.axhline(1.0, color="k", lw=0.7, ls=":")
    sep.set_ylabel("min t10,i+1 / t90,i")
    sep.legend(fontsize=7)
    measured = np.array([run.crossing(0.5) for run in runs])
    predicted = np.array([run.predicted_crossing(0.5) for run in runs])
    colors = plt.cm.viridis(np.linspace(0, 0.85, measured.shape[1]))
    for i, s in enumerate(runs[0].s):
        t50.plot(alphas, predicted[:, i], "-", color=colors[i], lw=1)
        t50.plot(alphas, measured[:, i], "o", color=colors[i], ms=4, label=f"s = {s:g}")
    t50.plot(alphas, predicted[0, -1] * alphas[0] / alphas, ":", color="k", lw=0.8,
             label="∝ 1/α")
    t50.set_yscale("log")
    t50.set_ylabel("t50 (steps)")
    t50.legend(fontsize=7)
    angle.plot(alphas, [np.nanmax(checks.alignment(run).values["angles_degrees"])
                        for run in runs], "o-", color="tab:purple")
    angle.set_ylabel("angle to teacher at t50,k (°)")
    for ax in (sep, t50, angle):
        ax.set_xscale("log")
        ax.set_xlabel("init scale α")
        ax.grid(alpha=0.3, which="both")
    first = runs[0].setting
    fig.suptitle(f"init-scale sweep, D={first.depth} {first.optimizer}", fontsize=9)
    return fig
