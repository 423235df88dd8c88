"""InRank on the character GPT: a grown low-rank cumulative update vs full-rank training (issue 5).

Two parts, each recording its runs with the Recorder (spectra.tasks.runs.gpt_run) under --out:

- ``ablations``: short runs (500 steps, seed 0) that choose the details, one question each:
  the factors' learning rate, the cost of the rank cap alone, how new ranks are initialised,
  what the rule sees, the second moment of new columns, and the efficient variant's stage
  switch. Each row answers one question against its baseline row.
- ``compare``: the default 1500-step GPTTraining, seeds 0 and 1: full rank, vanilla InRank
  (buffer 8 and 16, α = 0.9 and 0.95), efficient InRank, and a fixed rank of 32 (25%: is the growth worth
  anything over simply capping the rank?). Measured: validation bits/char, fraction of the
  converted layers' total rank trained (Σ(r + b) / Σ min(m, n)), trainable parameters, wall
  time per step (interleaved side by side in one process, at each method's final ranks), and
  the rank of each layer over steps beside the full-rank run's cumulative-update ranks
  (effective rank and the InRank rule applied to its ΔW_t, from its store via spectra.analysis.analyzer).

    python analyses/inrank_gpt.py                    # both parts (~3 h at 1 thread, 2-core CPU)
    python analyses/inrank_gpt.py --part compare     # finished runs in --out are reused
    python analyses/inrank_gpt.py --quick            # about a minute: 20 / 30-step runs

Writes figures/inrank-{ranks,loss,ablations}.png, figures/inrank-compare.csv (one row per run),
figures/inrank-ablations.csv and figures/inrank-summary.json (with --quick: inrank-quick-*).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from _study import last_finite, parse, study_parser  # noqa: E402

from spectra import plot  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.tasks.data import CharCorpus, kjv_text  # noqa: E402
from spectra.tasks.runs import gpt_run  # noqa: E402
from spectra.methods import build_method  # noqa: E402
from spectra.methods.inrank.layers import LowRankLinear  # noqa: E402
from spectra.tasks.models import GPT, GPTConfig  # noqa: E402
from spectra.store import is_run_store, open_run  # noqa: E402
from spectra.tasks.loops import GPTTraining  # noqa: E402

# The chosen details, each from an ablation below: new columns U = 0 / V orthogonal to the
# current V (function unchanged; the default), their Adam second moment 0 (the default), the
# rule on the change of U Vᵀ since its previous evaluation, the factors at 4× the learning rate.
INRANK = {"lr_scale": 4.0, "buffer": 8, "rule_input": "increment"}
# more room to grow: the 1500-step runs' ranks lagged the rule on the full-rank run's ΔW
INRANK_B16 = {**INRANK, "buffer": 16}
INRANK_A95 = {**INRANK, "alpha": 0.95}
EFFICIENT = {"lr_scale": 4.0, "buffer": 16, "rule_input": "increment"}
FIXED_RANK = 32  # 25% of the converted layers' total rank, InRank's budget
FIRST = {"lr_scale": 2.0, "buffer": 8, "fresh_moments": "row-mean"}  # where the ablations began

# name → (method, options, question), 500 steps, seed 0. The InRank rows change one detail of
# FIRST each; "inrank-chosen" is INRANK. The efficient rows search ranks for 250 steps.
ABLATIONS = {
    "full": ("full", {}, "reference"),
    "fixed128-lr1": ("fixed-rank", {"rank": 128}, "factor lr, no rank cap"),
    "fixed128-lr2": ("fixed-rank", {"rank": 128, "lr_scale": 2.0}, "factor lr, no rank cap"),
    "fixed32-lr1": ("fixed-rank", {"rank": 32}, "factor lr, rank 32"),
    "fixed32-lr2": ("fixed-rank", {"rank": 32, "lr_scale": 2.0}, "factor lr, rank 32"),
    "fixed32-lr4": ("fixed-rank", {"rank": 32, "lr_scale": 4.0}, "factor lr, rank 32"),
    "fixed16-lr2": ("fixed-rank", {"rank": 16, "lr_scale": 2.0}, "factor lr, rank 16"),
    "inrank": ("inrank", FIRST, "InRank, first configuration"),
    "inrank-lr4": ("inrank", {**FIRST, "lr_scale": 4.0}, "factor lr"),
    "inrank-random": ("inrank", {**FIRST, "new_columns": "random"}, "new columns"),
    "inrank-kaiming": ("inrank", {**FIRST, "new_columns": "kaiming"}, "new columns"),
    "inrank-active": ("inrank", {**FIRST, "rule_input": "active"}, "what the rule sees"),
    "inrank-increment": ("inrank", {**FIRST, "rule_input": "increment"}, "what the rule sees"),
    "inrank-zero-v": ("inrank", {**FIRST, "fresh_moments": "zero"}, "new columns' Adam v"),
    "inrank-increment-zero-v": ("inrank", {**FIRST, "rule_input": "increment",
                                           "fresh_moments": "zero"}, "combined"),
    "inrank-chosen": ("inrank", INRANK, "combined"),
    "efficient-first": ("inrank-efficient", {"lr_scale": 2.0, "buffer": 16,
                                             "fresh_moments": "row-mean"},
                        "efficient (search 166 steps)"),
    "efficient-product": ("inrank-efficient", {**EFFICIENT, "rule_input": "product",
                                               "search_steps": 250}, "efficient"),
    "efficient-chosen": ("inrank-efficient", {**EFFICIENT, "search_steps": 250}, "efficient"),
}
QUICK_ABLATIONS = ("full", "fixed32-lr2", "inrank-chosen", "efficient-chosen")
COMPARE = {
    "full": ("full", {}),
    "inrank": ("inrank", INRANK),
    "inrank-b16": ("inrank", INRANK_B16),
    "inrank-a0.95": ("inrank", INRANK_A95),
    "inrank-efficient": ("inrank-efficient", EFFICIENT),
    f"fixed-rank-{FIXED_RANK}": ("fixed-rank", {"rank": FIXED_RANK, "lr_scale": 4.0}),
}
COLORS = {"full": "tab:gray", "inrank": "tab:blue", "inrank-b16": "tab:purple",
          "inrank-a0.95": "tab:red",
          "inrank-efficient": "tab:green",
          f"fixed-rank-{FIXED_RANK}": "tab:orange"}
MLP_LAYERS = [f"blocks.{i}.mlp.{name}" for i in range(4) for name in ("c_fc", "c_proj")]


def main() -> None:
    parser = study_parser(__doc__, out="runs/inrank_gpt", quick="tiny runs (about a minute)")
    parser.add_argument("--part", choices=["ablations", "compare", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the comparison (default 0 1; quick 0)")
    args = parse(parser)
    tag = "-quick" if args.quick else ""
    summary = {}
    if args.part in ("ablations", "all"):
        table = ablations(args)
        table.to_csv(args.figures / f"inrank{tag}-ablations.csv", index=False,
                     float_format="%.5g")
        plot.save(ablation_figure(table), args.figures / f"inrank{tag}-ablations.png")
        print(table.drop(columns=["options"]).to_string(index=False))
        summary["ablations"] = table.to_dict(orient="records")
    if args.part in ("compare", "all"):
        runs = compare(args)
        table = pd.DataFrame([run_row(name, seed, path) for (name, seed), path in runs.items()])
        timing = step_times(runs, args)
        table["ms_per_step"] = table["method"].map(timing)
        table.to_csv(args.figures / f"inrank{tag}-compare.csv", index=False, float_format="%.5g")
        plot.save(loss_figure(runs), args.figures / f"inrank{tag}-loss.png")
        plot.save(ranks_figure(runs, args.quiet), args.figures / f"inrank{tag}-ranks.png")
        means = summarise(table)
        print(means.to_string(index=False))
        summary["compare"] = means.to_dict(orient="records")
    path = args.figures / f"inrank{tag}-summary.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **summary}, indent=1, default=float) + "\n")


# -- training ------------------------------------------------------------------------------------

def training(args: argparse.Namespace, steps: int, seed: int) -> GPTTraining:
    if args.quick:
        return GPTTraining(steps=steps, eval_every=10, eval_batches=2, warmup=5, seed=seed)
    return GPTTraining(steps=steps, seed=seed)


def quick_options(method: str, options: dict, args: argparse.Namespace) -> dict:
    """--quick: the rule's schedule shrunk to the short runs (warm-up 5, every 5 steps)."""
    if not args.quick or method == "full":
        return options
    return {"warmup": 5, "every": 5, **options}


def trained(name: str, method: str, options: dict, steps: int, seed: int,
            args: argparse.Namespace) -> Path:
    """The store of run ``name`` (trained now unless a finished one with the same method,
    options and length is in --out)."""
    path = args.out / f"{name}{'-quick' if args.quick else ''}-{steps}-s{seed}.zarr"
    options = quick_options(method, options, args)
    if not args.fresh and is_run_store(path):
        attrs = open_run(path).attrs
        config = attrs.get("config", {})
        if "history" in attrs and config.get("options") == options and \
                config.get("method") == method:
            return path
    shutil.rmtree(path, ignore_errors=True)
    if not args.quiet:
        print(f"{name} ({method} {options}) seed {seed}, {steps} steps → {path}", flush=True)
    result = gpt_run(method, path, training=training(args, steps, seed), options=options,
                     quiet=args.quiet)
    if not args.quiet:
        print(f"  {result.final['val_bpc']:.4f} bits/char in {result.seconds:.0f} s", flush=True)
    return path


def ablations(args: argparse.Namespace) -> pd.DataFrame:
    steps = 20 if args.quick else 500
    rows = []
    for name, (method, options, question) in ABLATIONS.items():
        if args.quick and name not in QUICK_ABLATIONS:
            continue
        path = trained(name, method, options, steps, 0, args)
        rows.append({"question": question, **run_row(name, 0, path), "options": options})
    table = pd.DataFrame(rows)
    full = table.loc[table["method"] == "full", "val_bpc"].iloc[0]
    table.insert(4, "vs_full_percent", 100 * (table["val_bpc"] / full - 1))
    return table


def compare(args: argparse.Namespace) -> dict[tuple[str, int], Path]:
    steps = 30 if args.quick else 1500
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    return {(name, seed): trained(name, method, options, steps, seed, args)
            for seed in seeds for name, (method, options) in COMPARE.items()}


# -- numbers -------------------------------------------------------------------------------------

def run_row(name: str, seed: int, path: Path) -> dict:
    """A run's final numbers, read back from its store."""
    run = open_run(path)
    history = run.attrs["history"]
    last = {key: last_finite(values) for key, values in run.scalars.items()
            if np.isfinite(values).any()}
    ranks = [value for key, value in last.items() if key.startswith("rank.")]
    return {"method": name, "seed": seed, "steps": int(run.steps[-1]),
            "val_bpc": history[-1]["val_bpc"],
            "rank_fraction": last.get("rank_fraction", 1.0),
            "mean_rank": float(np.mean(ranks)) if ranks else np.nan,
            "trainable_params": int(last["trainable_params"]),
            "seconds": run.attrs["seconds"]}


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean, standard deviation and range over seeds; ``vs_full_percent``: the
    bits/char relative to the full-rank run of the same seed."""
    full = table[table["method"] == "full"].set_index("seed")["val_bpc"]
    table = table.assign(vs_full_percent=100 * (table["val_bpc"] / table["seed"].map(full) - 1))
    rows = []
    for method, part in table.groupby("method", sort=False):
        row = {"method": method, "seeds": len(part)}
        for column in ("val_bpc", "vs_full_percent", "rank_fraction", "mean_rank"):
            values = part[column].to_numpy(dtype=float)
            row[column] = values.mean()
            row[column + "_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
            row[column + "_range"] = f"[{values.min():.4g}, {values.max():.4g}]"
        row["trainable_params"] = int(part["trainable_params"].mean())
        row["ms_per_step"] = part["ms_per_step"].iloc[0]
        row["run_seconds"] = part["seconds"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def step_times(runs: dict[tuple[str, int], Path], args: argparse.Namespace,
               rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Milliseconds per training step of each method at its seed-0 run's final ranks, timed
    side by side: ``rounds`` rounds of ``steps`` steps per method, interleaved; the median."""
    corpus = CharCorpus(kjv_text())
    setups = {name: final_model(name, path, corpus) for (name, seed), path in runs.items()
              if seed == min(s for _, s in runs)}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in setups}
    batch = 8 if args.quick else 32
    steps = 2 if args.quick else steps
    for _ in range(1 if args.quick else rounds):
        for name, (model, optimizer) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                x, y = corpus.batch("train", batch, model.config.block_size, generator)
                _, loss = model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: float(np.median(values)) for name, values in times.items()}


def final_model(name: str, path: Path, corpus: CharCorpus) -> tuple[GPT, torch.optim.Optimizer]:
    """A model converted by ``name``'s method with the ranks its run ended at, and its
    optimizer (no step taken yet, so resizing the factors needs no state surgery)."""
    run = open_run(path)
    method, options = COMPARE[name][0], run.attrs["config"]["options"]
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size))
    built = build_method(method, model, lr=1e-3, weight_decay=0.1, total_steps=1500, **options)
    for key, values in run.scalars.items():
        if key.startswith("rank."):
            model.get_submodule(key.removeprefix("rank.")).grow(int(values[-1]))
    if method == "inrank-efficient":
        for layer in model.modules():
            if isinstance(layer, LowRankLinear):
                layer.truncate(layer.rank)
    return model, built.optimizer


# -- figures -------------------------------------------------------------------------------------

def curves(runs: dict[tuple[str, int], Path]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(open_run(path).attrs["history"]).assign(method=name, seed=seed)
                      for (name, seed), path in runs.items()])


def loss_figure(runs: dict[tuple[str, int], Path]) -> plt.Figure:
    """Validation bits/char over steps (mean over seeds, band: min to max), and the fraction of
    the converted layers' total rank that is trained."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for name, part in curves(runs).groupby("method", sort=False):
        stats = part.groupby("step")["val_bpc"].agg(["mean", "min", "max"])
        axes[0].plot(stats.index, stats["mean"], color=COLORS[name], label=name)
        axes[0].fill_between(stats.index, stats["min"], stats["max"], color=COLORS[name],
                             alpha=0.15)
    axes[0].set_ylabel("validation bits/char")
    axes[0].set_ylim(None, 3.0)
    for (name, seed), path in runs.items():
        run = open_run(path)
        fraction = run.scalars.get("rank_fraction", np.ones(len(run.steps)))
        axes[1].plot(run.steps, fraction, color=COLORS[name], alpha=0.8,
                     label=name if seed == min(s for _, s in runs) else None)
    axes[1].axhline(0.25, color="black", linestyle=":", linewidth=1, label="25% goal")
    axes[1].set_ylabel("trained rank / total rank (MLP layers)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("char GPT (KJV): full rank vs InRank")
    return fig


def ranks_figure(runs: dict[tuple[str, int], Path], quiet: bool) -> plt.Figure:
    """Per MLP layer: InRank's rank r (and trained r + b), efficient InRank's rank, beside the
    full-rank run's cumulative update ΔW_t: its effective rank and the InRank rule's rank."""
    seed = min(s for _, s in runs)
    frame = analyze(runs["full", seed], targets=("updates",), k=0, quiet=quiet,
                    params=[f"{name}.weight" for name in MLP_LAYERS])
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6), sharex=True, sharey=True,
                             constrained_layout=True)
    for ax, layer in zip(axes.T.ravel(), MLP_LAYERS):
        part = frame[(frame["param"] == f"{layer}.weight") & (frame["step"] > 0)]
        for metric, style, label in (("effective_rank", "-", "full: erank ΔW"),
                                     ("inrank_rank", "--", "full: rule on ΔW")):
            rows = part[part["metric"] == metric]
            ax.plot(rows["step"], rows["value"], color=COLORS["full"], linestyle=style,
                    label=label)
        for name in ("inrank", "inrank-b16", "inrank-a0.95", "inrank-efficient"):
            run = open_run(runs[name, seed])
            rank = run.scalars[f"rank.{layer}"]
            ax.plot(run.steps, rank, color=COLORS[name], label=f"{name}: r")
        run = open_run(runs["inrank", seed])
        buffer = COMPARE["inrank"][1].get("buffer", 16)
        ax.plot(run.steps, np.minimum(run.scalars[f"rank.{layer}"] + buffer, 128),
                color=COLORS["inrank"], linestyle=":", label="inrank: r + b trained")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("step")
    fig.supylabel("rank (of 128)")
    fig.suptitle(f"rank per MLP layer (seed {seed}) vs the full-rank run's cumulative update")
    return fig


def ablation_figure(table: pd.DataFrame) -> plt.Figure:
    """Validation bits/char of each ablation run, grouped by question, with its rank fraction."""
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(table) + 1.2), constrained_layout=True)
    labels = [f"{row.question}: {row.method}" for row in table.itertuples()]
    questions = list(dict.fromkeys(table["question"]))
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["val_bpc"],
            color=[plt.cm.tab10(questions.index(q) % 10) for q in table["question"]])
    for yi, row in zip(y, table.itertuples()):
        ax.text(row.val_bpc, yi, f" {row.val_bpc:.3f}  ({100 * row.rank_fraction:.0f}% rank)",
                va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(table["val_bpc"].min() - 0.15, table["val_bpc"].max() + 0.12)
    ax.set_xlabel(f"validation bits/char after {int(table['steps'].iloc[0])} steps (seed 0)")
    ax.grid(alpha=0.3, axis="x")
    return fig


if __name__ == "__main__":
    main()
