"""OIALR on the character GPT: the official preset and ours against a tuned full-rank baseline.

The GPT half of the OIALR study (the MLP half: oialr_mlp.py), under the protocol of
analyses/README.md. The stability trigger runs with the single ratio chosen on the MLP's tuning
seeds (read back from those runs, unchanged here): the test of a scale-free rule is that one
setting serves both tasks. OIALR converts the block Linears (attention and MLP; embeddings never,
the head stays dense by keep_last); the full-rank runs are shared with inrank_gpt.py. The
official preset and our fixed-delay arm are left out of this grid for time (the MLP study
compares all four arms; a GPT run is ~7 minutes of one core): the GPT half tests only whether
the stability trigger's MLP setting carries over.

    python analyses/oialr_gpt.py                  # hours on a busy 2-core CPU; runs reused
    python analyses/oialr_gpt.py --arms oialr-official   # train only these arms (no tables)
    python analyses/oialr_gpt.py --quick          # a few minutes: 30-step runs, 1 + 1 seeds

Writes into --figures the tables oialr-gpt-{tuning,runs,summary}.csv and the figures
oialr-gpt-{accuracy,ranks,stability,trigger}.png.
"""

from __future__ import annotations

import torch

from _oialr import arms, run_study
from _study import Protocol, Study, gpt_task, mlp_task, parse, select, \
    study_parser
from inrank_gpt import LRS, REPORTING_SEEDS, STEPS, TUNING_SEEDS, VOCAB, gpt_loss
from oialr_mlp import LRS as MLP_LRS, RATIOS, TUNING_SEEDS as MLP_TUNING, choose_ratio

from spectra.tasks.models import GPT, GPTConfig


def main() -> None:
    args = parse(study_parser(__doc__, out="runs/studies", protocol=True))
    if args.quick:
        ratio = RATIOS[1]
        study = Study(gpt_task(30, quick=True, snapshot_every=10),
                      Protocol((0,), (10,), (2e-3,), min_reporting=1), args)
        options = {"check_every": 5}
    else:
        mlp = Study(mlp_task(30), Protocol(MLP_TUNING, (10, 11, 12), MLP_LRS), args)
        ratio, _ = choose_ratio(mlp, RATIOS)
        study = Study(gpt_task(STEPS), Protocol(TUNING_SEEDS, REPORTING_SEEDS, LRS), args)
        options = {}
    chosen = arms(ratio, official=False, fixed_delay=False, trigger_options=options)
    run_study(study, select(chosen, args), args, "oialr-gpt", model, gpt_loss)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB))


if __name__ == "__main__":
    main()
