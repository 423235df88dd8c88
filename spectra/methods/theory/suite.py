"""The default suite behind ``spectra theory``: which runs, which checks, what theory expects.

Around a main setting (depth D, α, optimizer, width, teacher, seed) it records

- the main run, the same at the other depth (2 ↔ 3) with gradient descent, and the same with
  each other optimizer (gd, sgd, adam);
- an init-scale sweep with gradient descent at depth D over ``alphas`` (and the main α);

then runs C1 and C2 on the runs at α, C3–C5 on the main run, its other-depth companion (C3) and
the largest α of the sweep, and the sweep checks (C2 slope over α ≤ 0.2, C4 vs α, C6).

What theory expects of each row (``CheckResult.expected``, derived by :func:`check_runs` from
the settings and the closed forms, never written per row): C1 holds for α^D ≤ 0.4
(docs/architecture.md §5); C2 holds for gd and sgd, and breaks for adam (no 1/s law); C3 holds
where the reduced flow predicts separated steps (separation ≥ 1.2) and breaks where it predicts
overlapping ones (< 1); C4 holds for α^D ≤ 0.002·s_r ("small α") and breaks for α^D ≥ s_r, the
init as large as the weakest mode; C5 holds for α^D ≤ 0.01·s_r ("moderate α"); C4 vs α holds;
C6 holds where the closed form's separation crosses 1 within the sweep and breaks where it
does not. Elsewhere no claim. The measurements behind these bounds: docs/theory.md.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from spectra.core.threads import TRAINING_THREADS, torch_threads
from spectra.store import is_run_store
from spectra.methods.theory import checks
from spectra.methods.theory.checks import CheckResult
from spectra.methods.theory.measure import Trajectory, load
from spectra.methods.theory.training import OPTIMIZERS, Setting, train

SWEEP_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SLOPE_MAX_ALPHA = 0.2
SEPARATED = 1.2
SMALL_INIT = 0.01
ALIGNED_INIT = 0.002


@dataclass
class SuiteResult:
    """The rows of the report and the measured runs behind them (``runs`` by setting name;
    ``main``, ``companion``: the main run and its other-depth twin; ``sweep``: ascending α)."""

    rows: list[CheckResult]
    runs: dict[str, Trajectory]
    main: Trajectory
    companion: Trajectory
    sweep: list[Trajectory]
    seconds: float


def run_suite(out: str | Path, *, depth: int = 3, alpha: float = 0.1, optimizer: str = "gd",
              width: int = 32, teacher: Sequence[float] = (8.0, 4.0, 2.0, 1.0), seed: int = 0,
              alphas: Sequence[float] = SWEEP_ALPHAS, quiet: bool = False,
              threads: int | None = TRAINING_THREADS) -> SuiteResult:
    """Record the suite's runs into ``out`` (one store per setting, replaced if it exists) and
    check them. Returns the rows and the measured runs. ``threads``: torch threads while
    training (spectra.core.threads; None leaves torch's setting alone)."""
    start = time.perf_counter()
    main = Setting(depth=depth, alpha=alpha, optimizer=optimizer, width=width,
                   teacher=tuple(teacher), seed=seed)
    plan = suite_settings(main, alphas)
    lazy = plan["sweep"][-1]
    with torch_threads(threads):
        runs = {setting: _recorded(setting, Path(out), layers=setting in (main, lazy),
                                   quiet=quiet)
                for setting in dict.fromkeys([main, *plan["companion"], *plan["others"],
                                              *plan["sweep"]])}
    rows = check_runs(runs, main, alphas)
    (companion,) = plan["companion"]
    return SuiteResult(rows=rows, runs={s.name: run for s, run in runs.items()},
                       main=runs[main], companion=runs[companion],
                       sweep=[runs[s] for s in plan["sweep"]],
                       seconds=time.perf_counter() - start)


def suite_settings(main: Setting,
                   alphas: Sequence[float] = SWEEP_ALPHAS) -> dict[str, list[Setting]]:
    """The runs the suite checks around ``main``: its other-depth ``companion`` (gradient
    descent), the ``others`` optimizers, and the gradient-descent ``sweep`` over ``alphas``
    (and main's α), ascending."""
    return {"companion": [replace(main, depth=3 if main.depth == 2 else 2, optimizer="gd")],
            "others": [replace(main, optimizer=name) for name in OPTIMIZERS
                       if name != main.optimizer],
            "sweep": [replace(main, optimizer="gd", alpha=a)
                      for a in sorted({*alphas, main.alpha})]}


def check_runs(runs: Mapping[Setting, Trajectory], main: Setting,
               alphas: Sequence[float] = SWEEP_ALPHAS) -> list[CheckResult]:
    """C1–C6 on the measured runs of ``suite_settings(main, alphas)`` (``runs`` by setting),
    each row with what theory expects of it (module docstring), sorted by check."""
    plan = suite_settings(main, alphas)
    (companion,) = plan["companion"]
    sweep, lazy = plan["sweep"], plan["sweep"][-1]
    rows = []
    for setting in [main, companion, *plan["others"]]:
        rows += [_expect(checks.order(runs[setting]), main.alpha ** setting.depth <= 0.4 or None),
                 _expect(checks.timing(runs[setting]), setting.optimizer != "adam")]
    small = [runs[s] for s in sweep if s.alpha <= SLOPE_MAX_ALPHA]
    if len(small) >= 2:
        rows.append(_expect(checks.timing_slope(small), True))
    for setting in [main, companion] + ([lazy] if lazy != main else []):
        run = runs[setting]
        rows.append(_expect(checks.staircase(run), _claim(checks.separation(run, predicted=True),
                                                          holds_from=SEPARATED, breaks_below=1.0)))
        if setting is companion:
            continue
        init = setting.alpha ** setting.depth / run.s[-1]  # W_0's scale against the weakest mode
        aligned = False if init >= 1 else init <= ALIGNED_INIT or None
        rows += [_expect(checks.alignment(run), aligned),
                 _expect(checks.updates_vs_weights(run), init <= SMALL_INIT or None)]
    swept = [runs[s] for s in sweep]
    predicted = [checks.separation(run, predicted=True) for run in swept]
    rows += [_expect(checks.alignment_growth(swept), True),
             _expect(checks.init_sweep(swept), predicted[0] > 1 > predicted[-1])]
    return sorted(rows, key=lambda row: row.check)  # stable: within a check, in the order above


def _recorded(setting: Setting, out: Path, *, layers: bool, quiet: bool) -> Trajectory:
    """Train ``setting`` into ``out/<name>.zarr`` (replacing an earlier store) and measure it."""
    path = out / f"{setting.name}.zarr"
    if path.exists():
        if not is_run_store(path):
            raise ValueError(f"{path} exists and is not a run store; choose another --out")
        shutil.rmtree(path)
    train(setting, path, quiet=quiet)
    return load(path, layers=layers)


def _claim(value: float, *, holds_from: float, breaks_below: float) -> bool | None:
    """True from ``holds_from`` up, False below ``breaks_below``, None (no claim) between."""
    if value >= holds_from:
        return True
    return False if value < breaks_below else None


def _expect(result: CheckResult, expected: bool | None) -> CheckResult:
    return replace(result, expected=expected)
