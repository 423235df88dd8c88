"""The suite's results as tables: the checks (text and CSV) and the tidy frames its figures
are drawn from (by spectra.plot.theory; this module draws nothing).

- ``format_table``: a Markdown table (check, setting, measured, predicted, result, theory).
- ``write_table``: the same rows as CSV, with the numbers behind each row as JSON.
- ``modes_frame``: singular values of W_t − W_0 over steps, the closed-form mode curves, the
  loss and its predicted plateaus, as one long frame.
- ``sweep_frame``: the init-scale sweep: staircase separation, t_50 and alignment against α.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spectra.methods.theory import checks
from spectra.methods.theory.checks import CheckResult
from spectra.methods.theory.closed_forms import mode_trajectory, plateau_losses
from spectra.methods.theory.measure import Trajectory

_EXPECTED = {True: "holds", False: "breaks", None: "no claim"}


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


MODES_COLUMNS = ["step", "series", "index", "source", "value"]
SWEEP_COLUMNS = ["alpha", "quantity", "mode", "source", "value"]


def modes_frame(run: Trajectory, points: int = 300) -> pd.DataFrame:
    """The product's modes over time, long (columns ``MODES_COLUMNS``).

    series "sigma": σ_index(W_t − W_0) at each snapshot t > 0 (source "measured") and, for
    gradient descent and SGD, the closed-form m_index(t) − m_index(0) on ``points`` log-spaced
    steps (source "closed form"); "loss": ½‖W_t − T‖²_F at each snapshot t > 0; "plateau":
    the predicted plateau ½Σ_{j>index} s_j² (step NaN). ``attrs``: title, teacher_rank, s_min.
    """
    steps = run.steps
    shown = steps > 0
    parts = []
    for j in range(run.update_sv.shape[1]):
        parts.append(_series(steps[shown], "sigma", j + 1, "measured", run.update_sv[shown, j]))
    if run.setting.optimizer != "adam":
        grid = np.geomspace(max(1, steps[shown][0]), steps[-1], points)
        setting = run.setting
        for i, (s, m0) in enumerate(zip(run.s, run.m0)):
            curve = mode_trajectory(np.concatenate([[0.0], grid]), s, m0, setting.alpha,
                                    setting.depth, setting.tau)[1:]
            parts.append(_series(grid, "sigma", i + 1, "closed form", curve - m0))
    parts.append(_series(steps[shown], "loss", 0, "measured", run.loss[shown]))
    levels = plateau_losses(run.s)
    parts.append(pd.DataFrame({"step": np.nan, "series": "plateau",
                               "index": np.arange(1, len(levels) + 1), "source": "predicted",
                               "value": levels}))
    frame = pd.concat(parts, ignore_index=True)[MODES_COLUMNS]
    frame.attrs = {"title": f"{checks.label(run.setting)}, teacher s = "
                            f"{', '.join(f'{s:g}' for s in run.s)}",
                   "teacher_rank": int(run.teacher.rank), "s_min": float(run.s[-1])}
    return frame


def sweep_frame(runs: Sequence[Trajectory]) -> pd.DataFrame:
    """The init-scale sweep (runs differing in α), long (columns ``SWEEP_COLUMNS``).

    quantity "separation": min_i t10,i+1 / t90,i (mode 0; measured and predicted); "t50":
    t_50 per mode (mode i = 1..r, steps; measured and predicted); "angle": the largest angle to
    the teacher's subspaces at t_50,k (mode 0, degrees; measured). ``attrs``: title, s.
    """
    runs = sorted(runs, key=lambda run: run.setting.alpha)
    rows = []
    for run in runs:
        alpha = run.setting.alpha
        rows.append((alpha, "separation", 0, "predicted", checks.separation(run, predicted=True)))
        rows.append((alpha, "separation", 0, "measured", checks.separation(run)))
        for source, t50 in (("measured", run.crossing(0.5)),
                            ("predicted", run.predicted_crossing(0.5))):
            rows += [(alpha, "t50", i + 1, source, value) for i, value in enumerate(t50)]
        angles = checks.alignment(run).values["angles_degrees"]
        rows.append((alpha, "angle", 0, "measured", float(np.nanmax(angles))))
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    first = runs[0].setting
    frame.attrs = {"title": f"init-scale sweep, D={first.depth} {first.optimizer}",
                   "s": [float(s) for s in runs[0].s]}
    return frame


def _series(steps: np.ndarray, series: str, index: int, source: str,
            values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"step": np.asarray(steps, dtype=np.float64), "series": series,
                         "index": index, "source": source, "value": values})
