"""OIALR vs full rank on the MNIST-5k MLP and the character GPT (issue 6, docs/oialr.md).

Each task is trained three ways, each run recorded with the Recorder (spectra.tasks.runs):
full rank; OIALR with the paper's fixed delay (a third of training, a cut every 1/30 of it);
OIALR where each layer converts when its measured top-k basis stability has settled
(``oialr-stability``, no delay). Measured: test accuracy (MLP) or validation bits/char (GPT),
trainable parameters over time, ranks per layer, conversion steps, wall time; the stability
heatmap of the full-rank run (the OIALR paper's figure) from its store via spectra.analysis.analyzer.

    python analyses/oialr_mnist.py                # MLP 30 epochs × 3 seeds, GPT 1500 steps × 1
    python analyses/oialr_mnist.py --quick        # about a minute: 3 epochs, 30 GPT steps
    python analyses/oialr_mnist.py --tasks mlp    # one task; finished runs in --out are reused

Writes figures/oialr-{mlp,gpt}-{stability,ranks,accuracy,trigger}.png, the runs' final
numbers to figures/oialr-{mlp,gpt}-runs.csv, their mean and spread over seeds to
figures/oialr-summary.csv, and the full-rank run's basis distances 1 − s (full basis and
top-8) at five points of training to figures/oialr-{mlp,gpt}-stability.csv (with --quick:
oialr-*-quick-* files).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from _study import last_finite, parse, study_parser  # noqa: E402

from spectra import plot  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.tasks.runs import gpt_run, mlp_run  # noqa: E402
from spectra.methods.oialr.controller import convert_layers  # noqa: E402
from spectra.tasks.models import GPT, MLP, GPTConfig  # noqa: E402
from spectra.capture.schedules import Every  # noqa: E402
from spectra.store import is_run_store, open_run  # noqa: E402
from spectra.tasks.loops import ClassifierTraining, GPTTraining  # noqa: E402

# label → (method, options). The MLP's first layer holds 60% of its weights; the calibration
# (docs/architecture.md §7) and the official code's default (keep_first_layer=False) factorise it. The GPT
# keeps the defaults. "oialr-reset" (MLP) measures the choice of transforming Adam's moments,
# "*-b0.1" (MLP) a milder cut than the default β = 0.2, "*-t0.01" a 10× looser trigger.
VARIANTS = {
    "mlp": {"full": ("full", {}),
            "oialr": ("oialr", {"keep_first": False}),
            "oialr-stability": ("oialr-stability", {"keep_first": False}),
            "oialr-reset": ("oialr", {"keep_first": False, "moments": "reset"}),
            "oialr-b0.1": ("oialr", {"keep_first": False, "beta": 0.1}),
            "oialr-stability-b0.1": ("oialr-stability", {"keep_first": False, "beta": 0.1}),
            "oialr-stability-t0.01": ("oialr-stability", {"keep_first": False,
                                                          "threshold": 1e-2})},
    "gpt": {"full": ("full", {}), "oialr": ("oialr", {}),
            "oialr-stability": ("oialr-stability", {}),
            "oialr-stability-t0.01": ("oialr-stability", {"threshold": 1e-2})},
}
COLORS = {"full": "tab:gray", "oialr": "tab:blue", "oialr-stability": "tab:orange",
          "oialr-reset": "tab:green", "oialr-b0.1": "tab:purple",
          "oialr-stability-b0.1": "tab:brown", "oialr-stability-t0.01": "tab:red"}
SCORE = {"mlp": ("test_accuracy", "epoch"), "gpt": ("val_bpc", "step")}
VOCAB = 73  # characters of the KJV text (spectra.tasks.data.CharCorpus): the GPT's output size


def main() -> None:
    parser = study_parser(__doc__, out="runs/oialr", quick="tiny runs (about a minute)")
    parser.add_argument("--tasks", nargs="+", choices=["mlp", "gpt"], default=["mlp", "gpt"])
    parser.add_argument("--seeds", type=int, default=None, help="MLP seeds (default 3; quick 1)")
    parser.add_argument("--gpt-seeds", type=int, default=1)
    parser.add_argument("--gpt-steps", type=int, default=None, help="default 1500; quick 30")
    args = parse(parser)
    tag = "-quick" if args.quick else ""
    summaries = []
    for task in args.tasks:
        runs = train_all(task, args)
        table = pd.DataFrame([run_row(task, method, seed, path)
                              for (method, seed), path in runs.items()])
        draw(task, runs, args.figures, tag, args.quiet)
        table.to_csv(args.figures / f"oialr-{task}{tag}-runs.csv", index=False,
                     float_format="%.6g")
        summaries.append(summarise(table).assign(**step_times(task, runs, args.quick)))
    summary = merge_summary(pd.concat(summaries), args.figures / f"oialr-summary{tag}.csv")
    print(readable(summary).to_string(index=False))


# -- training ----------------------------------------------------------------------------------

def train_all(task: str, args: argparse.Namespace) -> dict[tuple[str, int], Path]:
    """Train (or reuse) every (method, seed) run of ``task``; returns their store paths."""
    seeds = (args.seeds or (1 if args.quick else 3)) if task == "mlp" else args.gpt_seeds
    runs = {}
    for seed in range(seeds):
        for label in VARIANTS[task]:
            path = args.out / f"{task}{'-quick' if args.quick else ''}-{label}-s{seed}.zarr"
            if args.fresh or not finished(path):
                shutil.rmtree(path, ignore_errors=True)
                train_one(task, label, seed, path, args)
            runs[label, seed] = path
    return runs


def finished(path: Path) -> bool:
    return is_run_store(path) and "history" in open_run(path).attrs


def train_one(task: str, label: str, seed: int, path: Path, args: argparse.Namespace) -> None:
    method, options = VARIANTS[task][label]
    if not args.quiet:
        print(f"{task} {label} seed {seed} → {path}", flush=True)
    if task == "mlp":
        training = ClassifierTraining(epochs=3 if args.quick else 30, seed=seed)
        result = mlp_run(method, path, training=training, options=options, quiet=args.quiet)
    else:
        steps = args.gpt_steps or (30 if args.quick else 1500)
        training = GPTTraining(steps=steps, eval_every=max(10, steps // 15),
                               eval_batches=4 if args.quick else 20,
                               warmup=min(100, steps // 10), seed=seed)
        # evenly spaced snapshots: the stability heatmap compares consecutive ones
        result = gpt_run(method, path, training=training, options=options, quiet=args.quiet,
                         schedule=Every(max(1, steps // 30)))
    if not args.quiet:
        print(f"  {SCORE[task][0]} {result.final[SCORE[task][0]]:.4f}, "
              f"{result.scalars.get('trainable_percent', 100.0):.1f}% trainable, "
              f"{result.seconds:.0f} s", flush=True)


# -- numbers -----------------------------------------------------------------------------------

def run_row(task: str, method: str, seed: int, path: Path) -> dict:
    """One run's final numbers, read back from its store."""
    run = open_run(path)
    history = run.attrs["history"]
    scalars = {name: last_finite(values) for name, values in run.scalars.items()}
    score = SCORE[task][0]
    row = {"task": task, "method": method, "seed": seed, score: history[-1][score],
           "best_" + score: (max if task == "mlp" else min)(h[score] for h in history),
           "trainable_percent": scalars.get("trainable_percent", 100.0),
           "seconds": run.attrs["seconds"], "steps": int(run.steps[-1])}
    for name, value in sorted(scalars.items()):
        if name.startswith(("rank.", "converted_at.")):
            row[name] = value
    return row


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and range over seeds of the headline numbers; ``delta``: the
    score minus that of the full-rank run with the same seed (same data split and init)."""
    score = SCORE[table["task"].iloc[0]][0]
    full = table[table["method"] == "full"].set_index("seed")[score]
    table = table.assign(delta=table[score] - table["seed"].map(full))
    rows = []
    for (task, method), part in table.groupby(["task", "method"], sort=False):
        row = {"task": task, "method": method, "seeds": len(part)}
        for column in (score, "delta", "trainable_percent", "seconds"):
            values = part[column].to_numpy(dtype=float)
            row[f"{column}_mean"] = values.mean()
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
            row[f"{column}_min"], row[f"{column}_max"] = values.min(), values.max()
        converted = [c for c in part if c.startswith("converted_at.")]
        if converted:
            steps = part[converted].to_numpy(dtype=float)
            row["converted_at_mean"] = np.nanmean(steps) if np.isfinite(steps).any() else np.nan
            row["layers_converted_mean"] = np.isfinite(steps).sum(axis=1).mean()
        rows.append(row)
    return pd.DataFrame(rows)


def readable(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as printed: mean ± standard deviation [min, max] over seeds."""
    def spread(row: pd.Series, column: str, digits: int) -> str:
        if not np.isfinite(row.get(f"{column}_mean", np.nan)):
            return ""
        return (f"{row[f'{column}_mean']:.{digits}f} ± {row[f'{column}_std']:.{digits}f} "
                f"[{row[f'{column}_min']:.{digits}f}, {row[f'{column}_max']:.{digits}f}]")

    return pd.DataFrame({
        "task": summary["task"], "method": summary["method"], "seeds": summary["seeds"],
        "score": [spread(row, SCORE[row["task"]][0], 4) for _, row in summary.iterrows()],
        "vs full (same seed)": [spread(row, "delta", 4) for _, row in summary.iterrows()],
        "trainable %": [spread(row, "trainable_percent", 1) for _, row in summary.iterrows()],
        "seconds": [spread(row, "seconds", 0) for _, row in summary.iterrows()],
        "ms/step (final ranks)": summary["step_ms"].round(1),
        "layers converted": summary.get("layers_converted_mean"),
        "mean conversion step": summary.get("converted_at_mean").round(0),
    })


def step_times(task: str, runs: dict[tuple[str, int], Path], quick: bool) -> dict:
    """Milliseconds per training step (forward, backward, AdamW) of the model at the final
    ranks of each method's seed-0 run (layers it never converted stay dense), interleaved, the
    minimum of 5 repeats: the per-run wall times on a shared machine are too noisy to compare."""
    models = {}
    for label in VARIANTS[task]:
        models[label] = demo_model(task)
        _, ranks = series(runs[label, 0], "rank.")
        _, converted = series(runs[label, 0], "converted_at.")
        for path, layer in convert_layers(models[label], list(converted)).items():
            layer.truncate(int(last_finite(ranks[path])))
    batch = demo_batch(task)
    steps = 2 if quick else (20 if task == "gpt" else 200)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(5):
        for label, model in models.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            start = time.perf_counter()
            for _ in range(steps):
                loss = demo_loss(task, model, batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            times[label].append((time.perf_counter() - start) / steps * 1e3)
    return {"step_ms": [min(times[label]) for label in models]}


def demo_model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((784, 512, 512, 10)) if task == "mlp" else GPT(GPTConfig(vocab_size=VOCAB))


def demo_batch(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if task == "mlp":
        return torch.rand(64, 784, generator=generator), torch.randint(0, 10, (64,))
    ids = torch.randint(0, VOCAB, (32, 129), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def demo_loss(task: str, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y) if task == "mlp" else model(x, y)[1]


def merge_summary(summary: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write ``summary`` to ``path``, keeping the rows of tasks not run this time."""
    if path.exists():
        old = pd.read_csv(path)
        summary = pd.concat([old[~old["task"].isin(summary["task"])], summary],
                            ignore_index=True)
    summary.to_csv(path, index=False, float_format="%.6g")
    return summary


# -- figures -----------------------------------------------------------------------------------

def draw(task: str, runs: dict[tuple[str, int], Path], figures: Path, tag: str,
         quiet: bool) -> None:
    prefix = figures / f"oialr-{task}{tag}"
    frame = analyze(runs["full", 0], targets=("weights",), k=8, quiet=quiet)
    plot.save(plot.stability_heatmap(frame, "oialr_stability_prev", "weights"),
              f"{prefix}-stability.png")
    plot.save(ranks_figure(task, runs), f"{prefix}-ranks.png")
    plot.save(score_figure(task, runs), f"{prefix}-accuracy.png")
    plot.save(trigger_figure(frame, runs), f"{prefix}-trigger.png")
    stability_table(frame).to_csv(f"{prefix}-stability.csv", index=False, float_format="%.4g")


def series(path: Path, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Recorded steps and every scalar whose name starts with ``prefix`` (prefix removed)."""
    run = open_run(path)
    return run.steps, {name.removeprefix(prefix): values for name, values in run.scalars.items()
                       if name.startswith(prefix)}


def ranks_figure(task: str, runs: dict[tuple[str, int], Path]) -> plt.Figure:
    """Rank per layer over steps (seed 0) for both OIALR runs, and trainable parameters."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for ax, method in zip(axes, ("oialr", "oialr-stability")):
        steps, ranks = series(runs[method, 0], "rank.")
        for i, (name, values) in enumerate(ranks.items()):
            ax.plot(steps, values, color=plt.cm.viridis(i / max(1, len(ranks) - 1)), label=name)
        ax.set_title(f"{method}: rank per layer (seed 0)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2 if len(ranks) > 6 else 1)
    ax = axes[2]
    for (method, seed), path in runs.items():
        steps, values = series(path, "trainable_percent")
        curve = values.get("", np.full(len(steps), 100.0))
        ax.plot(steps, curve, color=COLORS[method], alpha=0.7,
                label=method if seed == 0 else None)
    ax.set_title("trainable parameters, % of the full model", fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"OIALR on the {task.upper()}")
    return fig


def score_figure(task: str, runs: dict[tuple[str, int], Path]) -> plt.Figure:
    """Test accuracy (MLP) or validation bits/char (GPT) during training: the mean over seeds,
    and each method minus full rank with the same seed (mean, band: min to max)."""
    score, x = SCORE[task]
    curves = pd.concat([pd.DataFrame(open_run(path).attrs["history"]).assign(method=method,
                                                                             seed=seed)
                        for (method, seed), path in runs.items()])
    full = curves[curves["method"] == "full"].set_index(["seed", x])[score]
    curves["delta"] = curves[score] - pd.Series(list(zip(curves["seed"], curves[x]))).map(
        full).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for method, part in curves.groupby("method", sort=False):
        stats = part.groupby(x)[[score, "delta"]].agg(["mean", "min", "max"])
        axes[0].plot(stats.index, stats[score, "mean"], color=COLORS[method], label=method)
        axes[1].plot(stats.index, stats["delta", "mean"], color=COLORS[method], label=method)
        axes[1].fill_between(stats.index, stats["delta", "min"], stats["delta", "max"],
                             color=COLORS[method], alpha=0.12)
    label = "test accuracy" if task == "mlp" else "validation bits/char"
    seeds = curves["seed"].nunique()
    axes[0].set_ylabel(f"{label} (mean of {seeds} seed{'s' if seeds > 1 else ''})")
    axes[1].set_ylabel(f"{label} − full rank, same seed")
    if task == "mlp":
        axes[0].set_ylim(0.9, 0.97)
        axes[1].set_ylim(-0.02, 0.02)
    for ax in axes:
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task.upper()}: full rank vs OIALR")
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


def trigger_figure(frame: pd.DataFrame, runs: dict[tuple[str, int], Path]) -> plt.Figure:
    """Left: the full-rank run's 1 − s, full basis vs top-8. Right: what the stability trigger
    read (1 − top-8 stability per layer between its checks), its conversions marked."""
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
    steps, stability = series(runs["oialr-stability", 0], "stability.")
    _, converted = series(runs["oialr-stability", 0], "converted_at.")
    for i, (name, values) in enumerate(stability.items()):
        color = plt.cm.viridis(i / max(1, len(stability) - 1))
        at = last_finite(converted.get(name, np.array([np.nan])))
        ok = np.isfinite(values) & ~(steps > at)  # the last reading stays in the scalars
        axes[1].plot(steps[ok], np.clip(1 - values[ok], 1e-9, None), color=color, label=name)
        if np.isfinite(at):
            axes[1].axvline(at, color=color, linestyle=":", linewidth=1)
    axes[1].axhline(1e-3, color="black", linewidth=0.8, linestyle="--", label="threshold")
    axes[1].set_title("oialr-stability (seed 0): 1 − top-8 stability between checks 50 steps "
                      "apart; dotted: conversion", fontsize=8)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("1 − stability")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2 if len(names) > 6 else 1)
    return fig


if __name__ == "__main__":
    main()
