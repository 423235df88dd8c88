"""analyses/_study.py enforces the study protocol of analyses/README.md."""

import argparse
import math
import sys
from pathlib import Path

import pytest
from torch import nn

import spectra
from spectra.store import annotate_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyses"))
from _study import Arm, Protocol, Study, Task, chosen_rates, summarise, runs_table  # noqa: E402


def test_a_seed_cannot_both_tune_and_report():
    with pytest.raises(ValueError, match=r"seeds \[0\] are both tuning and reporting"):
        Protocol(tuning_seeds=(0, 1), reporting_seeds=(0, 2, 3), lrs=(1e-3,))


def test_fewer_than_three_reporting_seeds_is_refused():
    with pytest.raises(ValueError, match="at least 3 distinct seeds"):
        Protocol(tuning_seeds=(0,), reporting_seeds=(1, 2, 2), lrs=(1e-3,))
    with pytest.raises(ValueError, match="tuning_seeds is empty"):
        Protocol(tuning_seeds=(), reporting_seeds=(1, 2, 3), lrs=(1e-3,))


def toy_task(calls):
    """A real recorded run per call (a tiny Linear), whose score peaks at lr = 2e-3 for the
    "good" method and at 4e-3 for the "eager" one, plus a seed-dependent offset."""
    def config(method, lr, seed, options):
        return {"method": method, "lr": lr, "seed": seed, "options": dict(options)}

    def train(method, path, lr, seed, options, quiet):
        calls.append((method, lr, seed))
        with spectra.Recorder(nn.Linear(3, 2), path, config=config(method, lr, seed, options)) \
                as recorder:
            recorder.step(loss=0.0)
        best = 2e-3 if method == "good" else 4e-3
        annotate_run(path, history=[{"score": -abs(math.log(lr / best)) + seed / 100}],
                      seconds=0.0)

    return Task("toy", train, config, "score", higher_is_better=True)


def test_every_arm_gets_the_same_sweep_on_tuning_seeds_and_only_reporting_seeds_are_reported(
        tmp_path):
    calls = []
    args = argparse.Namespace(out=tmp_path, fresh=False, quiet=True)
    protocol = Protocol(tuning_seeds=(0, 1), reporting_seeds=(10, 11, 12),
                        lrs=(1e-3, 2e-3, 4e-3))
    study = Study(toy_task(calls), protocol, args)
    arms = [Arm("baseline", "good"), Arm("method", "eager", {"option": 1})]
    tuning = study.tune(arms)
    assert sorted(calls) == sorted((m, lr, s) for m in ("good", "eager")
                                   for lr in (1e-3, 2e-3, 4e-3) for s in (0, 1))
    assert chosen_rates(tuning) == {"baseline": 2e-3, "method": 4e-3}
    runs = study.report(arms, chosen_rates(tuning))
    assert set(runs) == {(label, seed) for label in ("baseline", "method") for seed in (10, 11, 12)}
    reported = runs_table(runs, "score")
    assert set(reported["seed"]) == {10, 11, 12}
    summary = summarise(reported, ["score"], baseline="baseline", score="score", relative=False)
    assert list(summary["seeds"]) == ["10 11 12", "10 11 12"]
    assert summary.set_index("arm").loc["method", "delta_mean"] == pytest.approx(0.0)
    # finished runs with the same configuration are reused, not retrained
    count = len(calls)
    study.tune(arms)
    study.report(arms, chosen_rates(tuning))
    assert len(calls) == count
