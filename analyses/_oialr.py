"""What the two OIALR studies (oialr_mlp.py, oialr_gpt.py) share: their arms, their table, their
figures and the models their step times are measured on."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from _study import Arm, Study, Task, chosen_rates, last_finite, markdown, runs_table, spread, \
    step_times, summarise  # noqa: E402

from spectra import plot  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.methods.oialr.controller import convert_layers  # noqa: E402
from spectra.store import open_run  # noqa: E402

COLORS = {"full": "tab:gray", "oialr-official": "tab:purple", "oialr": "tab:blue",
          "oialr-stability": "tab:orange"}
LABELS = {"full": "full rank", "oialr-official": "OIALR, official preset (fixed delay)",
          "oialr": "OIALR, ours (fixed delay)",
          "oialr-stability": "OIALR-stability, ours (no delay)"}


def arms(ratio: float, *, official: bool = True, fixed_delay: bool = True,
         trigger_options: Mapping[str, object] | None = None) -> list[Arm]:
    """The arms of an OIALR study: full rank, the official preset (``official``), ours with the
    paper's fixed delay (``fixed_delay``) and ours with the stability trigger at ``ratio``."""
    return [Arm("full", "full"),
            *([Arm("oialr-official", "oialr", {"preset": "official"})] if official else []),
            *([Arm("oialr", "oialr")] if fixed_delay else []),
            Arm("oialr-stability", "oialr-stability",
                {"ratio": ratio, **(trigger_options or {})})]


def run_study(study: Study, chosen_arms: list[Arm], args: argparse.Namespace, name: str,
              model: Callable[[], torch.nn.Module], loss: Callable[[torch.nn.Module], torch.Tensor],
              tuning: pd.DataFrame | None = None) -> None:
    """Tune, report, then write the tables and figures of one OIALR study (unless --arms
    restricted it to training)."""
    tuned = study.tune(chosen_arms)
    if tuning is not None:
        tuned = pd.concat([tuning, tuned]).drop_duplicates(["arm", "lr"], keep="last")
    runs = study.report(chosen_arms, chosen_rates(tuned))
    if args.arms:
        return
    tag = "-quick" if args.quick else ""
    score = study.task.score
    tuned.to_csv(args.figures / f"{name}{tag}-tuning.csv", index=False, float_format="%.5g")
    table = runs_table(runs, score)
    table["trainable_percent"] = table.get("trainable_percent", pd.Series(dtype=float)).fillna(100.0)
    table.to_csv(args.figures / f"{name}{tag}-runs.csv", index=False, float_format="%.6g")
    summary = summarise(table, [score, "trainable_percent"], score=score,
                        relative=study.task.name == "gpt")
    summary["lr"] = summary["arm"].map(chosen_rates(tuned))
    finals = final_models(runs, chosen_arms, model)
    summary["ms_per_step"] = summary["arm"].map(step_times(finals, loss, steps=args.time_steps))
    summary.to_csv(args.figures / f"{name}{tag}-summary.csv", index=False, float_format="%.6g")
    shown = readable(summary, table, score, study.task.name == "gpt")
    print(shown.to_string(index=False))
    (args.figures / f"{name}{tag}-table.md").write_text(markdown(shown))
    draw(study, runs, args.figures / f"{name}{tag}", args.quiet)


def readable(summary: pd.DataFrame, table: pd.DataFrame, score: str, gpt: bool) -> pd.DataFrame:
    """The summary as printed and pasted into the docs."""
    scale, digits = (1.0, 4) if gpt else (100.0, 2)
    rows = []
    for _, row in summary.iterrows():
        part = table[table["arm"] == row["arm"]]
        converted = [c for c in part if c.startswith("converted_at.")]
        ranks = [c for c in part if c.startswith("rank.")]
        steps = part[converted].to_numpy(dtype=float) if converted else np.empty((0, 0))
        rows.append({"arm": row["arm"], "lr": row["lr"], "seeds": row["seeds"],
                     score: spread(row, score, digits, scale),
                     "vs full": spread(row, "delta", 2 if gpt else 2, 1.0 if gpt else 100.0),
                     "trainable %": spread(row, "trainable_percent", 2),
                     "layers converted": f"{np.isfinite(steps).sum(axis=1).mean():.1f}"
                     if converted else "—",
                     "converted at": _range(steps[np.isfinite(steps)]) if converted else "—",
                     "final ranks": ", ".join(_range(part[c].to_numpy()) for c in ranks[:2]),
                     "ms/step": round(row["ms_per_step"], 1)})
    return pd.DataFrame(rows)


def _range(values: np.ndarray) -> str:
    values = values[np.isfinite(values)]
    if not values.size:
        return "—"
    low, high = int(np.min(values)), int(np.max(values))
    return f"{low}" if low == high else f"{low}–{high}"


def final_models(runs: Mapping[tuple[str, int], Path], chosen_arms: list[Arm],
                 model: Callable[[], torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Per arm, the model with the layers its first reporting run converted, at the ranks it
    ended with (layers it never converted stay dense)."""
    first = min(seed for _, seed in runs)
    models = {}
    for arm in chosen_arms:
        run = open_run(runs[arm.label, first])
        built = model()
        converted = [k.removeprefix("converted_at.") for k, v in run.scalars.items()
                     if k.startswith("converted_at.") and np.isfinite(v).any()]
        for path, layer in convert_layers(built, converted).items():
            layer.truncate(int(last_finite(run.scalars[f"rank.{path}"])))
        models[arm.label] = built
    return models


# -- figures -----------------------------------------------------------------------------------

def draw(study: Study, runs: Mapping[tuple[str, int], Path], prefix: Path, quiet: bool) -> None:
    first = min(seed for _, seed in runs)
    frame = analyze(runs["full", first], targets=("weights",), k=8, quiet=quiet)
    plot.save(plot.stability_heatmap(frame, "oialr_stability_prev", "weights"),
              f"{prefix}-stability.png")
    plot.save(ranks_figure(runs, study.task.name), f"{prefix}-ranks.png")
    plot.save(score_figure(runs, study.task), f"{prefix}-accuracy.png")
    plot.save(trigger_figure(frame, runs), f"{prefix}-trigger.png")
    stability_table(frame).to_csv(f"{prefix}-stability.csv", index=False, float_format="%.4g")


def series(path: Path, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Recorded steps and every scalar whose name starts with ``prefix`` (prefix removed)."""
    run = open_run(path)
    return run.steps, {name.removeprefix(prefix): values for name, values in run.scalars.items()
                       if name.startswith(prefix)}


def ranks_figure(runs: Mapping[tuple[str, int], Path], task: str) -> plt.Figure:
    """Rank per layer over steps (first reporting seed) for each OIALR arm, and trainable
    parameters of every run."""
    first = min(seed for _, seed in runs)
    methods = [label for label in dict.fromkeys(label for label, _ in runs) if label != "full"]
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(4.2 * (len(methods) + 1), 3.6),
                             constrained_layout=True)
    for ax, method in zip(axes, methods):
        steps, ranks = series(runs[method, first], "rank.")
        for i, (name, values) in enumerate(ranks.items()):
            ax.plot(steps, values, color=plt.cm.viridis(i / max(1, len(ranks) - 1)), label=name)
        ax.set_title(f"{method}: rank per layer (seed {first})", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=5, ncol=2 if len(ranks) > 6 else 1)
    ax = axes[-1]
    for (method, seed), path in runs.items():
        steps, values = series(path, "trainable_percent")
        ax.plot(steps, values.get("", np.full(len(steps), 100.0)), color=COLORS[method],
                alpha=0.7, label=method if seed == first else None)
    ax.set_title("trainable parameters, % of the full model", fontsize=9)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"OIALR on the {task.upper()}")
    return fig


def score_figure(runs: Mapping[tuple[str, int], Path], task: Task) -> plt.Figure:
    """The score during training (mean over reporting seeds) and each arm minus full rank with
    the same seed (mean, band: min to max)."""
    score = task.score
    x = "epoch" if task.name == "mlp" else "step"
    curves = pd.concat([pd.DataFrame(open_run(path).attrs["history"]).assign(arm=arm, seed=seed)
                        for (arm, seed), path in runs.items()])
    full = curves[curves["arm"] == "full"].set_index(["seed", x])[score]
    curves["delta"] = curves[score] - pd.Series(list(zip(curves["seed"], curves[x]))).map(
        full).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for arm, part in curves.groupby("arm", sort=False):
        stats = part.groupby(x)[[score, "delta"]].agg(["mean", "min", "max"])
        axes[0].plot(stats.index, stats[score, "mean"], color=COLORS[arm], label=LABELS[arm])
        axes[1].plot(stats.index, stats["delta", "mean"], color=COLORS[arm], label=arm)
        axes[1].fill_between(stats.index, stats["delta", "min"], stats["delta", "max"],
                             color=COLORS[arm], alpha=0.12)
    label = "test accuracy" if task.name == "mlp" else "validation bits/char"
    axes[0].set_ylabel(f"{label} (mean of {curves['seed'].nunique()} reporting seeds)")
    axes[1].set_ylabel(f"{label} − full rank, same seed")
    if task.name == "mlp":
        axes[0].set_ylim(0.88, 0.97)
    else:
        axes[0].set_ylim(None, 3.0)
    for ax in axes:
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task.name.upper()}: full rank vs OIALR (reporting seeds)")
    return fig


def distances(frame: pd.DataFrame) -> pd.DataFrame:
    """1 − s between consecutive snapshots of the full-rank run's weights: the full basis
    (the authors' measure) and the top-8 triplets (the trigger's), one row per (param, step)."""
    data = frame[(frame["target"] == "weights")
                 & frame["metric"].isin(["oialr_stability_prev", "topk_stability_prev"])]
    table = data.pivot_table(index=["param", "step"], columns="metric", values="value",
                             observed=True).dropna().reset_index()
    return pd.DataFrame({"param": table["param"].astype(str), "step": table["step"],
                         "full_basis": 1 - table["oialr_stability_prev"],
                         "top8": 1 - table["topk_stability_prev"]})


def stability_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The distances at five points of training, for the docs."""
    table = distances(frame)
    steps = np.unique(table["step"])
    picks = steps[np.linspace(0, len(steps) - 1, 5).round().astype(int)]
    return table[table["step"].isin(picks)]


def trigger_figure(frame: pd.DataFrame, runs: Mapping[tuple[str, int], Path]) -> plt.Figure:
    """Left: the full-rank run's 1 − s, full basis vs top-8. Right: what the stability trigger
    read, relative to each layer's peak (the scale-free rule), its conversions marked."""
    first = min(seed for _, seed in runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True)
    table = distances(frame)
    names = list(dict.fromkeys(table["param"]))
    for i, name in enumerate(names):
        color = plt.cm.viridis(i / max(1, len(names) - 1))
        part = table[table["param"] == name]
        axes[0].plot(part["step"], part["top8"].clip(lower=1e-12), color=color,
                     label=name.removesuffix(".weight"))
        axes[0].plot(part["step"], part["full_basis"].clip(lower=1e-12), color=color,
                     linestyle="--", linewidth=0.8)
    axes[0].set_title("full-rank run, consecutive snapshots: top-8 (solid), full basis (dashed)",
                      fontsize=8)
    axes[0].set_ylabel("1 − stability")
    path = runs["oialr-stability", first]
    steps, stability = series(path, "stability.")
    _, peak = series(path, "stability_peak.")
    _, converted = series(path, "converted_at.")
    ratio = open_run(path).attrs["config"]["options"]["ratio"]
    for i, (name, values) in enumerate(stability.items()):
        color = plt.cm.viridis(i / max(1, len(stability) - 1))
        at = last_finite(converted.get(name, np.array([np.nan])))
        ok = np.isfinite(values) & ~(steps > at)  # the last reading stays in the scalars
        relative = (1 - values[ok]) / peak[name][ok]
        axes[1].plot(steps[ok], np.clip(relative, 1e-9, None), color=color, label=name)
        if np.isfinite(at):
            axes[1].axvline(at, color=color, linestyle=":", linewidth=1)
    axes[1].axhline(ratio, color="black", linewidth=0.8, linestyle="--", label="ratio")
    axes[1].set_title(f"oialr-stability (seed {first}): top-8 1 − s over its peak; dotted: "
                      "conversion", fontsize=8)
    axes[1].set_ylabel("(1 − s) / peak")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=5, ncol=2 if len(names) > 6 else 1)
    return fig
