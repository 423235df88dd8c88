"""OIALR on the MNIST-5k MLP: the official preset and ours against a tuned full-rank baseline.

Under the protocol of analyses/README.md (analyses/_study.py): every arm (full rank, OIALR with
the official preset, ours with the paper's fixed delay, ours with the stability trigger) gets
the same learning-rate sweep on the tuning seeds; the stability trigger's single setting, the
ratio, is chosen first on the same tuning seeds (and then used unchanged on the GPT,
oialr_gpt.py); reported numbers come only from the reporting seeds. Both hidden layers are
candidates (keep_first=False; the official default too); the 10-way output layer is not
eligible.

    python analyses/oialr_mlp.py             # ~2 h on a busy 2-core CPU, finished runs reused
    python analyses/oialr_mlp.py --quick     # a few minutes: 3 epochs, 1 + 1 seeds

Writes figures/oialr-mlp-{tuning,runs,summary}.csv, figures/oialr-mlp-ratio.csv (the trigger's
ratio sweep) and figures/oialr-mlp-{accuracy,ranks,stability,trigger}.png.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.nn import functional as F

from _oialr import arms, run_study
from _study import Arm, Protocol, Study, mlp_task, parse, run_row, select, \
    study_parser

from spectra.tasks.models import MLP

TUNING_SEEDS, REPORTING_SEEDS = (0,), (10, 11, 12, 13, 14)
LRS = (1e-3, 2e-3, 4e-3, 8e-3)
RATIOS = (0.01, 0.03, 0.1)  # the stability trigger's ratio, swept on the tuning seeds
RATIO_LR = 1e-3  # the learning rate of the ratio sweep (the demo's default)


def main() -> None:
    args = parse(study_parser(__doc__, out="runs/studies", protocol=True))
    if args.quick:
        protocol = Protocol((0,), (10,), (1e-3,), min_reporting=1)
        study = Study(mlp_task(3), protocol, args)
    else:
        study = Study(mlp_task(30), Protocol(TUNING_SEEDS, REPORTING_SEEDS, LRS), args)
    ratio, sweep = choose_ratio(study, RATIOS[1:2] if args.quick else RATIOS)
    if not args.arms:
        sweep.to_csv(args.figures / f"oialr-mlp{'-quick' if args.quick else ''}-ratio.csv",
                     index=False, float_format="%.5g")
        print(sweep.to_string(index=False), f"\nchosen ratio: {ratio:g}")
    run_study(study, select(arms(ratio), args), args, "oialr-mlp", model, loss)


def choose_ratio(study: Study, ratios: tuple[float, ...]) -> tuple[float, pd.DataFrame]:
    """The stability trigger's ratio with the best mean tuning accuracy at RATIO_LR (ties:
    the larger ratio, the earlier conversion)."""
    rows = []
    for ratio in ratios:
        arm = Arm("oialr-stability", "oialr-stability", {"ratio": ratio})
        for seed in study.protocol.tuning_seeds:
            row = run_row(study.run(arm, RATIO_LR, seed), study.task.score)
            rows.append({"ratio": ratio, "seed": seed, "test_accuracy": row["test_accuracy"],
                         "trainable_percent": row["trainable_percent"]})
    table = pd.DataFrame(rows).groupby("ratio", as_index=False).mean(numeric_only=True)
    best = table[table["test_accuracy"] == table["test_accuracy"].max()]["ratio"].max()
    return float(best), table.drop(columns="seed")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((784, 512, 512, 10))


_BATCH = (torch.rand(64, 784, generator=torch.Generator().manual_seed(0)),
          torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)))


def loss(net: torch.nn.Module) -> torch.Tensor:
    x, y = _BATCH
    return F.cross_entropy(net(x), y)


if __name__ == "__main__":
    main()
