"""The checks C1–C6 of docs/architecture.md §5, each a function of measured runs returning a CheckResult.

Notation: s_1 > … > s_r the teacher's values, t_p,i the step at which mode i's projection
u_iᵀ W v_i first reaches p·s_i, "predicted" the reduced flow of spectra.methods.theory.closed_forms
started from each mode's own m_0 = u_iᵀ W_0 v_i with τ = 1/lr. Pass criteria:

C1 order        every t_50,i reached and t_50,1 < t_50,2 < … < t_50,r.
C2 timing       every |t_50,i / predicted − 1| ≤ 10%.
C2 slope        over an α sweep, the slope of log t_50,i vs log α is within 0.05 of the
                predicted one for every mode (theory: ≈ −1 for D = 3 and small α).
C3 staircase    #{j: σ_j(W_t − W_0) > s_r/2} rises one at a time (never by 2 between snapshots,
                never falls) up to r, and while it equals k (k = 1..r−1) the loss, read where it
                is flattest (smallest |d ln L / d ln t|), is within 10% of ½·Σ_{j>k} s_j².
C4 alignment    at the snapshot nearest t_50,k (k = 1..r), the largest principal angles between
                the top-k left and right singular subspaces of W_t − W_0 and the teacher's
                are all ≤ 5°.
C4 vs α         over an α sweep the largest of those angles grows with α (Spearman ρ ≥ 0.8).
C5 ΔW vs W      from t_50,1 on, erank(W_t − W_0) ≤ erank(W_t) + 0.05 at every snapshot, for each
                layer and for the product (the tolerance covers ΔW ≈ W when W_0 ≈ 0).
C6 init sweep   the staircase separation min_i t_10,i+1 / t_90,i is within 15% (+0.02) of the
                predicted one at every α, never rises with α (5% slack), and goes from > 1 at
                the smallest α to < 1 at the largest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from spectra.core import metrics
from spectra.methods.theory.closed_forms import plateau_losses
from spectra.methods.theory.measure import PRODUCT, Trajectory
from spectra.methods.theory.training import Setting

TIMING_TOLERANCE = 0.10
SLOPE_TOLERANCE = 0.05
PLATEAU_TOLERANCE = 0.10
MAX_ANGLE_DEGREES = 5.0
MIN_ANGLE_CORRELATION = 0.8
ERANK_SLACK = 0.05
SEPARATION_TOLERANCE = 0.15


@dataclass(frozen=True)
class CheckResult:
    """One row of the report. ``values``: the numbers behind ``measured`` / ``predicted``
    (JSON-serialisable, for the CSV/JSON). ``expected``: what theory says of this setting
    (True: the property holds, False: it breaks, None: no claim), set by the suite."""

    check: str
    setting: str
    measured: str
    predicted: str
    passed: bool
    values: dict[str, Any] = field(default_factory=dict)
    expected: bool | None = None

    @property
    def agrees(self) -> bool | None:
        """Whether the outcome is the one theory predicts (None without a claim)."""
        return None if self.expected is None else self.passed == self.expected


def label(setting: Setting) -> str:
    """A short description, e.g. ``D=3 α=0.1 gd``."""
    init = "" if setting.init == "orthogonal" else f" {setting.init}"
    batch = f" b={setting.batch_size}" if setting.optimizer == "sgd" else ""
    return f"D={setting.depth} α={setting.alpha:g} {setting.optimizer}{batch}{init}"


def order(run: Trajectory) -> CheckResult:
    """C1: modes are learned in the order of their singular values."""
    t50 = run.crossing(0.5)
    passed = bool(np.all(np.isfinite(t50)) and np.all(np.diff(t50) > 0))
    return CheckResult("C1 order", label(run.setting), f"t50 = {_steps(t50)}",
                       f"increasing as s = {_values(run.s)} decreases", passed,
                       {"t50": t50.tolist(), "s": run.s.tolist()})


def timing(run: Trajectory) -> CheckResult:
    """C2: t_50,i against the closed-form (reduced-flow) time, per mode."""
    t50, predicted = run.crossing(0.5), run.predicted_crossing(0.5)
    ratio = t50 / predicted
    passed = bool(np.all(np.abs(ratio - 1) <= TIMING_TOLERANCE))
    alpha, depth, tau = run.setting.alpha, run.setting.depth, run.setting.tau
    constant = law = ""
    if depth == 2:  # docs/architecture.md §5: t50 ≈ (τ/2s)·ln(c·s/α²)
        constant = f" (c = {_values(alpha**2 * np.exp(2 * run.s * t50 / tau) / run.s)})"
        law = f" (c = {_values(2 * alpha**2 / (alpha**2 + run.m0))})"
    elif depth == 3:  # docs/architecture.md §5: t50 ≈ C·τ/(s·α)
        constant = f" (C = {_values(t50 * run.s * alpha / tau)})"
        law = f" (C = {_values(predicted * run.s * alpha / tau)})"
    return CheckResult("C2 timing", label(run.setting), f"t50 = {_steps(t50)}{constant}",
                       f"{_steps(predicted)}{law}, ±{TIMING_TOLERANCE:.0%}", passed,
                       {"t50": t50.tolist(), "predicted": predicted.tolist(),
                        "ratio": ratio.tolist()})


def timing_slope(runs: Sequence[Trajectory]) -> CheckResult:
    """C2: the slope of log t_50 against log α over runs that differ only in α."""
    runs = _by_alpha(runs)
    log_alpha = np.log([run.setting.alpha for run in runs])
    measured = _slopes(log_alpha, np.log([run.crossing(0.5) for run in runs]))
    predicted = _slopes(log_alpha, np.log([run.predicted_crossing(0.5) for run in runs]))
    passed = bool(np.all(np.abs(measured - predicted) <= SLOPE_TOLERANCE))
    design = " (theory: −1 for D = 3)" if runs[0].setting.depth == 3 else ""
    return CheckResult("C2 slope", _sweep_label(runs),
                       f"d ln t50 / d ln α = {_values(measured)}",
                       f"{_values(predicted)}{design}, ±{SLOPE_TOLERANCE}",
                       passed, {"alpha": np.exp(log_alpha).tolist(),
                                "measured": measured.tolist(), "predicted": predicted.tolist()})


def staircase(run: Trajectory) -> CheckResult:
    """C3: the rank of W_t − W_0 rises one mode at a time, the loss plateauing in between."""
    r = run.teacher.rank
    count = run.update_rank(run.s[-1] / 2)
    steps = np.diff(count)
    one_at_a_time = bool(np.all((steps == 0) | (steps == 1)) and count[-1] == r)
    plateaus = np.array([_plateau_loss(run, count == k) for k in range(1, r)])
    predicted = plateau_losses(run.s)
    error = np.abs(plateaus / predicted - 1)
    passed = one_at_a_time and bool(np.all(error <= PLATEAU_TOLERANCE))
    rises = "one at a time" if one_at_a_time else f"jumps {sorted(set(steps.tolist()))}"
    return CheckResult("C3 staircase", label(run.setting),
                       f"rank rises {rises} to {count[-1]}; plateaus {_values(plateaus)}",
                       f"one at a time to {r}; plateaus {_values(predicted)} "
                       f"±{PLATEAU_TOLERANCE:.0%}", passed,
                       {"plateaus": plateaus.tolist(), "predicted": predicted.tolist(),
                        "final_rank": int(count[-1]), "one_at_a_time": one_at_a_time})


def alignment(run: Trajectory) -> CheckResult:
    """C4: at t_50,k the top-k subspaces of W_t − W_0 are the teacher's."""
    angles = _alignment_angles(run)
    worst = float(np.nanmax(angles)) if np.isfinite(angles).any() else float("nan")
    passed = bool(np.all(np.isfinite(angles)) and worst <= MAX_ANGLE_DEGREES)
    per_k = ", ".join(f"{a:.1f}" for a in np.max(angles, axis=1))
    return CheckResult("C4 alignment", label(run.setting),
                       f"largest angle at t50,k = {per_k}°",
                       f"≤ {MAX_ANGLE_DEGREES:g}° (small α)", passed,
                       {"angles_degrees": angles.tolist()})


def alignment_growth(runs: Sequence[Trajectory]) -> CheckResult:
    """C4: the misalignment at t_50,k grows with the init scale."""
    runs = _by_alpha(runs)
    alphas = np.array([run.setting.alpha for run in runs])
    worst = np.array([np.nanmax(_alignment_angles(run)) for run in runs])
    rho = float(stats.spearmanr(alphas, worst).statistic)
    passed = bool(rho >= MIN_ANGLE_CORRELATION)
    return CheckResult("C4 alignment vs α", _sweep_label(runs),
                       f"largest angle {_values(worst, 1)}°; Spearman ρ = {rho:.2f}",
                       f"grows with α (ρ ≥ {MIN_ANGLE_CORRELATION})", passed,
                       {"alpha": alphas.tolist(), "angle_degrees": worst.tolist(), "rho": rho})


def updates_vs_weights(run: Trajectory) -> CheckResult:
    """C5: the cumulative update has a lower effective rank than the weight it belongs to.
    ``run`` must be loaded with ``layers=True``."""
    frame = run.frame[run.frame["metric"] == "effective_rank"]
    if set(frame["target"]) != {"updates", "weights"}:
        raise ValueError(f"{run.path}: C5 needs the effective ranks of updates and weights; "
                         "load the run with layers=True")
    start = run.crossing(0.5)[0]
    start = start if np.isfinite(start) else run.steps[-1]
    excess, ends = {}, {}
    for param, part in frame[frame["step"] >= start].groupby("param", observed=True):
        table = part.pivot_table(index="step", columns="target", values="value", observed=True)
        excess[str(param)] = float((table["updates"] - table["weights"]).max())
        ends[str(param)] = (float(table["updates"].iloc[-1]), float(table["weights"].iloc[-1]))
    passed = bool(max(excess.values()) <= ERANK_SLACK)
    worst = max(excess, key=excess.get)
    layer = "layers.0.weight"
    s_layer = run.s ** (1 / run.setting.depth)  # a balanced split of each mode over D layers
    idle = np.full(min(run.setting.dim, run.setting.width) - run.teacher.rank, run.setting.alpha)
    return CheckResult(
        "C5 erank ΔW < W", label(run.setting),
        f"end erank ΔW/W: {_short(PRODUCT)} {_pair(ends[PRODUCT])}, {_short(layer)} "
        f"{_pair(ends[layer])}; max excess {excess[worst]:+.2f} ({_short(worst)})",
        f"ΔW below W; layer end ≈ {metrics.effective_rank(s_layer):.2f} / "
        f"{metrics.effective_rank(np.concatenate([s_layer, idle])):.2f}", passed,
        {"max_excess": excess, "end": ends})


def init_sweep(runs: Sequence[Trajectory]) -> CheckResult:
    """C6: the staircase separation falls as the init scale grows."""
    runs = _by_alpha(runs)
    alphas = np.array([run.setting.alpha for run in runs])
    measured = np.array([separation(run) for run in runs])
    predicted = np.array([separation(run, predicted=True) for run in runs])
    close = bool(np.all(np.abs(measured - predicted) <= SEPARATION_TOLERANCE * predicted + 0.02))
    falling = bool(np.all(np.diff(measured) <= 0.05 * measured[:-1]))
    crosses = bool(measured[0] > 1 > measured[-1])
    return CheckResult("C6 init sweep", _sweep_label(runs),
                       f"min t10,i+1/t90,i = {_values(measured)}",
                       f"{_values(predicted)} ±{SEPARATION_TOLERANCE:.0%}, falling through 1",
                       close and falling and crosses,
                       {"alpha": alphas.tolist(), "measured": measured.tolist(),
                        "predicted": predicted.tolist()})


def separation(run: Trajectory, *, predicted: bool = False) -> float:
    """The staircase separation min_i t_10,i+1 / t_90,i, measured or predicted: > 1 when every
    mode is learned before the next one starts."""
    crossing = run.predicted_crossing if predicted else run.crossing
    t10, t90 = crossing(0.1), crossing(0.9)
    return float(np.min(t10[1:] / t90[:-1]))


def _plateau_loss(run: Trajectory, inside: np.ndarray) -> float:
    """The loss where it is flattest (|d ln L / d ln t| smallest) among snapshots ``inside``;
    NaN if there are none."""
    index = np.flatnonzero(inside)
    if index.size == 0:
        return float("nan")
    log_t, log_loss = np.log(np.maximum(run.steps, 1)), np.log(run.loss)
    slope = np.full(log_t.size, np.inf)
    slope[1:-1] = np.abs((log_loss[2:] - log_loss[:-2]) / (log_t[2:] - log_t[:-2]))
    return float(run.loss[index[np.argmin(slope[index])]])


def _alignment_angles(run: Trajectory) -> np.ndarray:
    """(r, 2) largest left / right principal angles (degrees) at the snapshot nearest t_50,k."""
    angles = np.full((run.teacher.rank, 2), np.nan)
    for k, t in enumerate(run.crossing(0.5), start=1):
        if np.isfinite(t):
            angles[k - 1] = run.alignment_degrees(k, int(np.argmin(np.abs(run.steps - t))))
    return angles


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each column of y (n, r) against x (n,)."""
    return np.polyfit(x, y, 1)[0]


def _by_alpha(runs: Sequence[Trajectory]) -> list[Trajectory]:
    if len(runs) < 2:
        raise ValueError(f"an α sweep needs at least 2 runs; got {len(runs)}")
    return sorted(runs, key=lambda run: run.setting.alpha)


def _sweep_label(runs: Sequence[Trajectory]) -> str:
    first = runs[0].setting
    alphas = ", ".join(f"{run.setting.alpha:g}" for run in runs)
    return f"D={first.depth} {first.optimizer} α ∈ {{{alphas}}}"


def _steps(values: np.ndarray) -> str:
    return ", ".join("—" if not np.isfinite(v) else f"{v:.0f}" for v in values)


def _values(values: np.ndarray, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.0f}" for v in np.ravel(values))


def _pair(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.2f}/{pair[1]:.2f}"


def _short(param: str) -> str:
    return param.removesuffix(".weight")
