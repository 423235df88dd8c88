"""InRank on the character GPT: the official preset and ours against a tuned full-rank baseline.

Under the protocol of analyses/README.md (analyses/_study.py): every arm gets the same
learning-rate sweep on the tuning seed; reported numbers come only from the reporting seeds.
Arms: full rank; efficient InRank with the official preset (what the official code ships:
U Vᵀ from Kaiming factors, its rule, window, ceiling and buffer, counting forward calls);
vanilla InRank with our choices (W_0 + U Vᵀ, docs/inrank.md). (Efficient InRank with our
choices is left out of this grid for time; the machine was shared.) InRank converts the 8 MLP Linears (as the paper); attention, embeddings and the head
stay dense. Measured: validation bits/char, the fraction of the converted layers' total rank
trained (Σ(r + b) / Σ min(m, n)), trainable parameters, step time at the final ranks
(interleaved), and the rank of each layer beside the rule applied to the full-rank run's ΔW_t.

    python analyses/inrank_gpt.py                 # hours on a busy 2-core CPU; runs reused
    python analyses/inrank_gpt.py --arms full inrank   # train only these arms (no tables)
    python analyses/inrank_gpt.py --quick         # a few minutes: 30-step runs, 1 + 1 seeds

Writes figures/inrank-{tuning,runs,summary}.csv, figures/inrank-table.md and
figures/inrank-{loss,ranks}.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from _study import Arm, Protocol, Study, chosen_rates, gpt_task, last_finite, markdown, parse, \
    runs_table, select, spread, step_times, study_parser, summarise  # noqa: E402

from spectra import plot  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.methods import build_method  # noqa: E402
from spectra.methods.inrank.layers import InRankEfficientLinear  # noqa: E402
from spectra.store import open_run  # noqa: E402
from spectra.tasks.models import GPT, GPTConfig  # noqa: E402

STEPS = 800
TUNING_SEEDS, REPORTING_SEEDS = (0,), (10, 11, 12)
LRS = (2e-3, 4e-3)
ARMS = [Arm("full", "full"),
        Arm("inrank-official", "inrank-efficient", {"preset": "official"}),
        Arm("inrank", "inrank")]
COLORS = {"full": "tab:gray", "inrank-official": "tab:purple", "inrank": "tab:blue",
          "inrank-efficient": "tab:green"}
MLP_LAYERS = [f"blocks.{i}.mlp.{name}" for i in range(4) for name in ("c_fc", "c_proj")]
VOCAB = 73  # characters of the KJV text (spectra.tasks.data.CharCorpus): the GPT's output size


def main() -> None:
    args = parse(study_parser(__doc__, out="runs/studies", protocol=True))
    if args.quick:
        study = Study(gpt_task(30, quick=True, snapshot_every=10),
                      Protocol((0,), (10,), (2e-3,), min_reporting=1), args)
        arms = [Arm(a.label, a.method, {**a.options, "warmup": 5, "every": 5}) if a.method
                != "full" else a for a in ARMS]
    else:
        study = Study(gpt_task(STEPS), Protocol(TUNING_SEEDS, REPORTING_SEEDS, LRS), args)
        arms = ARMS
    arms = select(arms, args)
    tuning = study.tune(arms)
    runs = study.report(arms, chosen_rates(tuning))
    if args.arms:
        return
    tag = "-quick" if args.quick else ""
    tuning.to_csv(args.figures / f"inrank{tag}-tuning.csv", index=False, float_format="%.5g")
    table = runs_table(runs, "val_bpc")
    table["rank_fraction"] = table.get("rank_fraction", pd.Series(dtype=float)).fillna(1.0)
    table.to_csv(args.figures / f"inrank{tag}-runs.csv", index=False, float_format="%.6g")
    summary = summarise(table, ["val_bpc", "rank_fraction", "trainable_params"],
                        score="val_bpc", relative=True)
    summary["lr"] = summary["arm"].map(chosen_rates(tuning))
    times = step_times(final_models(runs, arms), gpt_loss, steps=args.time_steps)
    summary["ms_per_step"] = summary["arm"].map(times)
    summary.to_csv(args.figures / f"inrank{tag}-summary.csv", index=False, float_format="%.6g")
    shown = readable(summary)
    print(shown.to_string(index=False))
    (args.figures / f"inrank{tag}-table.md").write_text(markdown(shown))
    plot.save(loss_figure(runs), args.figures / f"inrank{tag}-loss.png")
    plot.save(ranks_figure(runs, args.quiet), args.figures / f"inrank{tag}-ranks.png")


def readable(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as printed and pasted into the docs."""
    return pd.DataFrame({
        "arm": summary["arm"], "lr": summary["lr"], "seeds": summary["seeds"],
        "val bits/char": [spread(r, "val_bpc", 4) for _, r in summary.iterrows()],
        "vs full %": [spread(r, "delta", 2) for _, r in summary.iterrows()],
        "rank used %": [spread(r, "rank_fraction", 1, 100.0) for _, r in summary.iterrows()],
        "trainable params": summary["trainable_params_mean"].round(0).astype(int),
        "ms/step": summary["ms_per_step"].round(0)})


# -- step times ----------------------------------------------------------------------------------

def final_models(runs: dict[tuple[str, int], Path], arms: list[Arm]) -> dict[str, torch.nn.Module]:
    """Per arm, the GPT converted by its method at the ranks its first reporting run ended with
    (efficient InRank after its stage-2 cut, which every run reaches at a third of training)."""
    first = min(seed for _, seed in runs)
    models = {}
    for arm in arms:
        run = open_run(runs[arm.label, first])
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB))
        build_method(arm.method, model, lr=1e-3, weight_decay=0.1,
                     total_steps=int(run.attrs["config"]["steps"]), **arm.options)
        for key, values in run.scalars.items():
            if key.startswith("rank."):
                layer = model.get_submodule(key.removeprefix("rank."))
                layer.grow(int(last_finite(values)))
                if isinstance(layer, InRankEfficientLinear):  # stage 2 began at a third
                    layer.truncate(layer.rank)
        models[arm.label] = model
    return models


_IDS = torch.randint(0, VOCAB, (32, 129), generator=torch.Generator().manual_seed(0))
_BATCH = (_IDS[:, :-1].contiguous(), _IDS[:, 1:].contiguous())


def gpt_loss(model: torch.nn.Module) -> torch.Tensor:
    """The GPT's loss on a fixed random batch (32 × 128), for step timing."""
    return model(*_BATCH)[1]


# -- figures -------------------------------------------------------------------------------------

def curves(runs: dict[tuple[str, int], Path]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(open_run(path).attrs["history"]).assign(arm=arm, seed=seed)
                      for (arm, seed), path in runs.items()])


def loss_figure(runs: dict[tuple[str, int], Path]) -> plt.Figure:
    """Validation bits/char over steps (mean over reporting seeds, band: min to max), and the
    fraction of the converted layers' total rank that is trained."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for arm, part in curves(runs).groupby("arm", sort=False):
        stats = part.groupby("step")["val_bpc"].agg(["mean", "min", "max"])
        axes[0].plot(stats.index, stats["mean"], color=COLORS[arm], label=arm)
        axes[0].fill_between(stats.index, stats["min"], stats["max"], color=COLORS[arm],
                             alpha=0.15)
    axes[0].set_ylabel("validation bits/char (reporting seeds)")
    axes[0].set_ylim(None, 3.0)
    first = min(seed for _, seed in runs)
    for (arm, seed), path in runs.items():
        run = open_run(path)
        fraction = run.scalars.get("rank_fraction", np.ones(len(run.steps)))
        axes[1].plot(run.steps, fraction, color=COLORS[arm], alpha=0.8,
                     label=arm if seed == first else None)
    axes[1].axhline(0.25, color="black", linestyle=":", linewidth=1, label="25% goal")
    axes[1].set_ylabel("trained rank / total rank (MLP layers)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("char GPT (KJV): tuned full rank vs InRank, official preset and ours")
    return fig


def ranks_figure(runs: dict[tuple[str, int], Path], quiet: bool) -> plt.Figure:
    """Per MLP layer: each InRank arm's rank r, beside the full-rank run's cumulative update
    ΔW_t: its effective rank and the InRank rule's rank."""
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
        for arm in (label for label, s in runs if s == seed and label != "full"):
            run = open_run(runs[arm, seed])
            ax.plot(run.steps, run.scalars[f"rank.{layer}"], color=COLORS[arm],
                    label=f"{arm}: r")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("step")
    fig.supylabel("rank (of 128)")
    fig.suptitle(f"rank per MLP layer (seed {seed}) vs the full-rank run's cumulative update")
    return fig


if __name__ == "__main__":
    main()
