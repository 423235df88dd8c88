"""Greedy low-rank learning in deep linear networks, at the size docs/theory.md reports.

What `spectra theory` checks once, over seeds, a finer init-scale grid, both depths, three
optimizers and four hidden widths. Every run is recorded with the Recorder (runs/glrl/) and
measured from its store (spectra.methods.theory.measure: spectra.analysis.analyzer, spectra.core.linalg,
spectra.core.metrics); predictions are the closed forms of spectra.methods.theory.closed_forms.

    python analyses/glrl_theory.py            # 3 seeds, ~10 min on 2 busy CPU cores
    python analyses/glrl_theory.py --quick    # 1 seed, a coarse grid, ~1 min

Writes into --figures: theory-modes-d3.png, theory-modes-d2.png (σ(W_t − W_0) with the closed
forms), theory-sweep.png (init-scale sweep, D = 3, seed 0), theory-optimizers.png, and the
numbers theory-sweep.csv, theory-optimizers.csv, theory-width.csv, theory-checks.csv.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from _study import parse, study_parser

from spectra.methods.theory import checks
from spectra.methods.theory.measure import Trajectory, load
from spectra.methods.theory.report import modes_frame, sweep_frame
from spectra.methods.theory.suite import check_runs, suite_settings
from spectra.methods.theory.training import Setting, train
from spectra.plot import modes_figure, save, sweep_figure

BASE = Setting(depth=3, alpha=0.1, snapshots=80)
FULL = {"seeds": (0, 1, 2), "alphas": (0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5, 0.7, 1.0),
        "optimizer_alphas": (0.05, 0.1, 0.2), "widths": (8, 16, 32, 64)}
QUICK = {"seeds": (0,), "alphas": (0.1, 0.3, 1.0), "optimizer_alphas": (0.1,),
         "widths": (8, 32)}
OPTIMIZERS = {"gd": {"optimizer": "gd"}, "sgd b=16": {"optimizer": "sgd", "batch_size": 16},
              "sgd b=4": {"optimizer": "sgd", "batch_size": 4},
              "sgd b=1": {"optimizer": "sgd", "batch_size": 1}, "adam": {"optimizer": "adam"}}


def main() -> None:
    args = parse(study_parser(__doc__, out="runs/glrl", quick="1 seed, coarse grids (~1 min)"))
    grid = QUICK if args.quick else FULL
    start = time.perf_counter()
    runs = Runs(args.out)

    sweeps = {(depth, seed): [runs.get(replace(BASE, depth=depth, alpha=a, seed=seed))
                              for a in grid["alphas"]]
              for depth in (3, 2) for seed in grid["seeds"]}
    sweep = pd.DataFrame([row for runs_ in sweeps.values() for run in runs_
                          for row in _mode_rows(run)])
    checks_table = _checks_over_seeds(runs, grid)
    optimizers = pd.DataFrame([row for name, options in OPTIMIZERS.items()
                               for a in grid["optimizer_alphas"] for seed in grid["seeds"]
                               for row in _mode_rows(runs.get(replace(BASE, alpha=a, seed=seed,
                                                                      **options)), name)])
    widths = pd.DataFrame([row for w in grid["widths"] for seed in grid["seeds"]
                           for row in _mode_rows(runs.get(replace(BASE, width=w, seed=seed)),
                                                 f"width {w}")])

    for depth in (3, 2):
        main_run = runs.get(replace(BASE, depth=depth, snapshots=200))
        save(modes_figure(modes_frame(main_run)), args.figures / f"theory-modes-d{depth}.png")
    save(sweep_figure(sweep_frame(sweeps[3, grid["seeds"][0]])), args.figures / "theory-sweep.png")
    save(_optimizers_figure([runs.get(replace(BASE, **options))
                             for options in OPTIMIZERS.values()], list(OPTIMIZERS)),
         args.figures / "theory-optimizers.png")
    for name, frame in (("sweep", sweep), ("optimizers", optimizers), ("width", widths),
                        ("checks", checks_table)):
        frame.to_csv(args.figures / f"theory-{name}.csv", index=False, float_format="%.5g")

    pd.set_option("display.width", 200)
    print(checks_table.to_string(index=False))
    print("\nseparation min t10,i+1/t90,i (mean over seeds, [min, max]), measured vs predicted")
    print(_spread(sweep.drop_duplicates(["depth", "alpha", "seed"]), ["depth", "alpha"],
                  ["separation", "separation_predicted"]).to_string())
    print("\nt50 / closed form, all modes (mean [min, max])")
    print(_spread(sweep, ["depth", "alpha"], ["t50_ratio"]).to_string())
    print(_spread(optimizers, ["setting", "alpha"], ["t50_ratio", "t50"]).to_string())
    print(_spread(widths, ["setting"], ["t50_ratio"]).to_string())
    print(f"\n{runs.count} runs in {time.perf_counter() - start:.0f} s; figures and CSV in "
          f"{args.figures}")


class Runs:
    """Record each setting once into ``folder`` (replacing an older store) and measure it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.measured: dict[Setting, Trajectory] = {}

    @property
    def count(self) -> int:
        return len(self.measured)

    def get(self, setting: Setting) -> Trajectory:
        if setting not in self.measured:
            path = self.folder / f"{setting.name}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            train(setting, path, quiet=True)
            self.measured[setting] = load(path, layers=_checked_for_c5(setting))
        return self.measured[setting]


def _checked_for_c5(setting: Setting) -> bool:
    """Runs whose layers C5 compares (effective ranks of every matrix, updates and weights)."""
    return setting == replace(BASE, depth=setting.depth, alpha=setting.alpha,
                              seed=setting.seed) and setting.alpha in (0.1, 1.0)


def _mode_rows(run: Trajectory, name: str = "") -> list[dict]:
    """One row per teacher mode: measured and predicted crossing times, the run's separation."""
    t10, t50, t90 = (run.crossing(p) for p in (0.1, 0.5, 0.9))
    predicted = run.predicted_crossing(0.5)
    setting = run.setting
    common = {"setting": name, "depth": setting.depth, "alpha": setting.alpha,
              "seed": setting.seed, "separation": checks.separation(run),
              "separation_predicted": checks.separation(run, predicted=True)}
    return [{**common, "mode": i + 1, "s": s, "m0": run.m0[i], "t10": t10[i], "t50": t50[i],
             "t90": t90[i], "t50_predicted": predicted[i], "t50_ratio": t50[i] / predicted[i]}
            for i, s in enumerate(run.s)]


def _checks_over_seeds(runs: Runs, grid: dict) -> pd.DataFrame:
    """C1–C6 of spectra.methods.theory.suite around α = 0.1 at both depths, on every seed: how
    often each row passes, what theory expects (derived by the suite), seed 0's numbers."""
    results = {}
    for seed in grid["seeds"]:
        for depth in (3, 2):
            main = replace(BASE, depth=depth, alpha=0.1, seed=seed)
            plan = suite_settings(main, grid["alphas"])
            settings = [main, *plan["companion"], *plan["others"], *plan["sweep"]]
            for row in check_runs({s: runs.get(s) for s in settings}, main, grid["alphas"]):
                found = results.setdefault((row.check, row.setting), {})
                found.setdefault(seed, row)  # a setting checked around both mains counts once
    expectations = {None: "no claim", True: "holds", False: "breaks"}
    return pd.DataFrame([{"check": check, "setting": setting,
                          "passed": f"{sum(r.passed for r in rows.values())}/{len(rows)}",
                          "theory": " / ".join(dict.fromkeys(expectations[r.expected]
                                                             for r in rows.values())),
                          "measured (first seed)": next(iter(rows.values())).measured,
                          "predicted (first seed)": next(iter(rows.values())).predicted}
                         for (check, setting), rows in results.items()])


def _spread(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """mean [min, max] of ``columns`` over seeds (and modes) within each group."""
    stats = frame.groupby(by)[columns].agg(["mean", "min", "max"])
    return pd.DataFrame({column: [f"{mean:.3g} [{low:.3g}, {high:.3g}]" for mean, low, high
                                  in stats[column].itertuples(index=False)]
                         for column in columns}, index=stats.index)


def _optimizers_figure(runs: list[Trajectory], names: list[str]) -> plt.Figure:
    """m_i(t)/s_i against step for each optimizer at the same α and seed."""
    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.8), sharey=True,
                             constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0, 0.85, runs[0].teacher.rank))
    for ax, run, name in zip(axes, runs, names):
        shown = run.steps > 0
        for i, s in enumerate(run.s):
            ax.plot(run.steps[shown], run.modes[shown, i] / s, color=colors[i], label=f"s={s:g}")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("u_iᵀ W_t v_i / s_i")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"D={runs[0].setting.depth}, α={runs[0].setting.alpha:g}, same teacher and init",
                 fontsize=9)
    return fig


if __name__ == "__main__":
    main()
