"""What every study in analyses/ shares: the protocol, the runs, the numbers (analyses/README.md).

    parser = study_parser(__doc__, out="runs/studies", quick="tiny runs (about a minute)")
    args = parse(parser)                          # sets torch's thread count from --threads
    protocol = Protocol(tuning_seeds=(0,), reporting_seeds=(10, 11, 12), lrs=(1e-3, 2e-3, 4e-3))
    study = Study(GPT_TASK, protocol, args)       # the task: how one run is trained
    chosen = study.tune(arms)                     # label → learning rate, from tuning seeds only
    runs = study.report(arms, chosen)             # (label, seed) → store, reporting seeds only

The protocol is the one written in analyses/README.md, enforced here: tuning and reporting
seeds are separate arguments and may not overlap; every arm, the full-rank baseline included,
gets the same learning-rate sweep on the tuning seeds; the chosen learning rate is the best
mean tuning score; reported numbers come only from ≥ 3 reporting seeds, as mean ± standard
deviation [min, max]. A finished run whose store holds the same configuration is reused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spectra.capture.schedules import Every
from spectra.store import is_run_store, open_run
from spectra.tasks.data import mnist5k
from spectra.tasks.loops import ClassifierTraining, GPTTraining
from spectra.tasks.runs import gpt_run, mlp_run

MIN_REPORTING_SEEDS = 3


# -- command line ----------------------------------------------------------------------------------

QUICK = "tiny runs, 1 tuning + 1 reporting seed (a smoke test, not the protocol's 3 seeds)"


def study_parser(doc: str, *, out: str, quick: str = QUICK,
                 protocol: bool = False) -> argparse.ArgumentParser:
    """A parser with --quick, --out (folder of the run stores), --figures, --fresh, --threads
    and --quiet (with ``protocol``, also --arms and --time-steps: ``protocol_args``); its
    description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=Path(out), help="folder of the run stores")
    parser.add_argument("--figures", type=Path, default=Path("figures"))
    parser.add_argument("--fresh", action="store_true", help="retrain runs found in --out")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: studies share the machine with other work)")
    parser.add_argument("--quiet", action="store_true")
    if protocol:
        protocol_args(parser)
    return parser


def protocol_args(parser: argparse.ArgumentParser) -> None:
    """--arms (train only these arms, write nothing: to split a study over processes) and
    --time-steps (steps per round of the step-time measurement)."""
    parser.add_argument("--arms", nargs="+", default=None,
                        help="train only these arms (tuning and reporting), write nothing")
    parser.add_argument("--time-steps", type=int, default=10)


def select(arms: list[Arm], args: argparse.Namespace) -> list[Arm]:
    """The arms --arms names (all without it)."""
    if not args.arms:
        return arms
    unknown = sorted(set(args.arms) - {arm.label for arm in arms})
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; accepted: {[a.label for a in arms]}")
    return [arm for arm in arms if arm.label in args.arms]


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, set torch's thread count, create --figures."""
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.figures.mkdir(parents=True, exist_ok=True)
    return args


# -- the protocol ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """Which seeds tune, which report, and the learning-rate sweep every arm gets.

    ``min_reporting``: the number of reporting seeds required (3; a --quick smoke run may
    lower it, and says so in its output file names)."""

    tuning_seeds: tuple[int, ...]
    reporting_seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    min_reporting: int = MIN_REPORTING_SEEDS

    def __post_init__(self) -> None:
        if not self.tuning_seeds:
            raise ValueError("tuning_seeds is empty: hyperparameters must be tuned on some seed")
        shared = sorted(set(self.tuning_seeds) & set(self.reporting_seeds))
        if shared:
            raise ValueError(f"seeds {shared} are both tuning and reporting seeds; a seed that "
                             "tuned a hyperparameter is never reported")
        if len(set(self.reporting_seeds)) < self.min_reporting:
            raise ValueError(f"reporting_seeds={self.reporting_seeds}; the protocol needs at "
                             f"least {self.min_reporting} distinct seeds")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs}; the sweep needs at least one positive rate")


@dataclass(frozen=True)
class Arm:
    """One configuration under study: a method of spectra.methods with its options."""

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """How a study trains one run: ``train(method, path, lr, seed, options, quiet)`` records a
    run into ``path``; ``config(method, lr, seed, options)`` is the configuration it writes into
    the store (what a finished run must match to be reused); ``score`` the history key that
    ranks runs and ``higher_is_better`` its direction."""

    name: str
    train: Callable[..., Any]
    config: Callable[..., dict]
    score: str
    higher_is_better: bool


def gpt_task(steps: int, *, quick: bool = False, snapshot_every: int = 50) -> Task:
    """The demo character GPT (spectra.tasks.runs.gpt_run) at ``steps`` optimizer steps,
    snapshots every ``snapshot_every`` steps (the stability heatmap compares consecutive ones)."""
    def training(lr: float, seed: int) -> GPTTraining:
        if quick:
            return GPTTraining(steps=steps, lr=lr, seed=seed, eval_every=10, eval_batches=2,
                               warmup=5)
        return GPTTraining(steps=steps, lr=lr, seed=seed)

    def train(method, path, lr, seed, options, quiet):
        return gpt_run(method, path, training=training(lr, seed), options=dict(options),
                       quiet=quiet, schedule=Every(min(snapshot_every, steps)))

    def config(method, lr, seed, options):
        return {"task": "char-gpt", "method": method, "options": dict(options),
                **vars(training(lr, seed))}

    return Task("gpt", train, config, "val_bpc", higher_is_better=False)


def mlp_task(epochs: int) -> Task:
    """The demo MNIST-5k MLP (spectra.tasks.runs.mlp_run), ``epochs`` epochs, a snapshot per epoch."""
    def training(lr: float, seed: int) -> ClassifierTraining:
        return ClassifierTraining(epochs=epochs, lr=lr, seed=seed)

    def train(method, path, lr, seed, options, quiet):
        return mlp_run(method, path, training=training(lr, seed), options=dict(options),
                       quiet=quiet)

    def config(method, lr, seed, options):
        train_size = len(mnist5k(seed).y_train)
        steps_per_epoch = -(-train_size // training(lr, seed).batch_size)
        return {"task": "mnist5k-mlp", "method": method, "options": dict(options),
                "steps_per_epoch": steps_per_epoch, **vars(training(lr, seed))}

    return Task("mlp", train, config, "test_accuracy", higher_is_better=True)


class Study:
    """Runs a set of arms on a task under a protocol (module docstring)."""

    def __init__(self, task: Task, protocol: Protocol, args: argparse.Namespace):
        self.task, self.protocol = task, protocol
        self.out, self.fresh, self.quiet = Path(args.out) / task.name, args.fresh, args.quiet

    # -- runs ----------------------------------------------------------------------------------

    def path(self, arm: Arm, lr: float, seed: int) -> Path:
        """Where the run is stored: named by method, a digest of its options, the learning
        rate and the seed, so that arms with the same configuration share their runs."""
        options = json.dumps(dict(arm.options), sort_keys=True)
        digest = hashlib.sha1(options.encode()).hexdigest()[:8]
        return self.out / f"{arm.method}-{digest}-lr{lr:g}-s{seed}.zarr"

    def run(self, arm: Arm, lr: float, seed: int) -> Path:
        """The store of ``arm`` at learning rate ``lr`` and ``seed``: trained now unless a
        finished run with the same configuration is in the output folder."""
        path = self.path(arm, lr, seed)
        config = self.task.config(arm.method, lr, seed, arm.options)
        with _claimed(path):  # another process training the same run: wait for it
            if not self.fresh and finished(path, config):
                return path
            if path.exists() and not is_run_store(path):
                raise ValueError(f"{path} exists and is not a run store; choose another --out")
            shutil.rmtree(path, ignore_errors=True)
            if not self.quiet:
                print(f"{self.task.name} {arm.label} ({arm.method} {dict(arm.options)}) "
                      f"lr {lr:g} seed {seed} → {path}", flush=True)
            start = time.perf_counter()
            result = self.task.train(arm.method, path, lr, seed, arm.options, self.quiet)
            if not self.quiet:
                print(f"  {self.task.score} {result.final[self.task.score]:.4f} in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            return path

    # -- the protocol's two phases -------------------------------------------------------------

    def tune(self, arms: Iterable[Arm]) -> pd.DataFrame:
        """Every arm at every learning rate of the sweep on every tuning seed. Returns one row
        per (arm, lr) with the mean tuning score and ``chosen`` marking each arm's best."""
        rows = []
        for arm in arms:
            for lr in self.protocol.lrs:
                scores = [final_score(self.run(arm, lr, seed), self.task.score)
                          for seed in self.protocol.tuning_seeds]
                rows.append({"arm": arm.label, "lr": lr, "tuning_score": float(np.mean(scores)),
                             "tuning_seeds": " ".join(map(str, self.protocol.tuning_seeds))})
        table = pd.DataFrame(rows)
        best = (table.groupby("arm", sort=False)["tuning_score"]
                .transform("max" if self.task.higher_is_better else "min"))
        table["chosen"] = table["tuning_score"] == best
        table["chosen"] &= ~table.duplicated(["arm", "chosen"])  # ties: the first (lowest) rate
        return table

    def report(self, arms: Iterable[Arm], chosen: Mapping[str, float]) -> dict[tuple[str, int], Path]:
        """Every arm at its chosen learning rate on every reporting seed."""
        return {(arm.label, seed): self.run(arm, chosen[arm.label], seed)
                for arm in arms for seed in self.protocol.reporting_seeds}


@contextlib.contextmanager
def _claimed(path: Path, poll: float = 30.0):
    """Hold ``<path>.lock`` (its owner's pid) while deciding on and training the run at
    ``path``, so that two processes of a study split by --arms never train the same run; a
    lock whose owner is gone is taken over."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            with open(lock, "x") as handle:
                handle.write(str(os.getpid()))
            break
        except FileExistsError:
            if not _alive(lock.read_text().strip()):
                lock.unlink(missing_ok=True)
                continue
            time.sleep(poll)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def chosen_rates(tuning: pd.DataFrame) -> dict[str, float]:
    """label → the learning rate tuning chose."""
    picked = tuning[tuning["chosen"]]
    return dict(zip(picked["arm"], picked["lr"]))


def finished(path: Path, config: dict) -> bool:
    """Whether ``path`` holds a finished run (its history written) with exactly ``config``."""
    if not is_run_store(path):
        return False
    attrs = open_run(path).attrs
    return "history" in attrs and attrs.get("config") == json.loads(json.dumps(config))


# -- numbers ---------------------------------------------------------------------------------------

def last_finite(values: np.ndarray) -> float:
    """The last finite entry of a recorded scalar series (NaN before the scalar first appeared),
    or NaN if it has none."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")


def final_score(path: Path, score: str) -> float:
    """The score at a run's last evaluation."""
    return float(open_run(path).attrs["history"][-1][score])


def run_row(path: Path, score: str) -> dict[str, Any]:
    """A run's final numbers, read back from its store: the score, the training length and
    time, and the last finite value of every recorded scalar of the method (ranks, trainable
    parameters, conversion steps, ...)."""
    run = open_run(path)
    row = {score: run.attrs["history"][-1][score], "steps": int(run.steps[-1]),
           "seconds": run.attrs["seconds"]}
    for name, values in run.scalars.items():
        if name != "loss" and np.isfinite(values).any():
            row[name] = last_finite(values)
    return row


def runs_table(runs: Mapping[tuple[str, int], Path], score: str) -> pd.DataFrame:
    """One row per reported run: arm, seed and run_row's numbers."""
    return pd.DataFrame([{"arm": label, "seed": seed, **run_row(path, score)}
                         for (label, seed), path in runs.items()])


def summarise(table: pd.DataFrame, columns: Iterable[str], *, baseline: str = "full",
              score: str, relative: bool) -> pd.DataFrame:
    """Per arm over its reporting seeds: mean, standard deviation (ddof 1), min and max of
    ``columns`` and of ``delta``, the score against the baseline run of the same seed (in % of
    it if ``relative``, else the difference)."""
    base = table[table["arm"] == baseline].set_index("seed")[score]
    reference = table["seed"].map(base)
    delta = 100 * (table[score] / reference - 1) if relative else table[score] - reference
    table = table.assign(delta=delta)
    rows = []
    for label, part in table.groupby("arm", sort=False):
        row = {"arm": label, "seeds": " ".join(map(str, sorted(part["seed"])))}
        for column in [*columns, "delta"]:
            values = part[column].to_numpy(dtype=float) if column in part else np.array([np.nan])
            row[f"{column}_mean"] = float(np.mean(values))
            row[f"{column}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row[f"{column}_min"], row[f"{column}_max"] = float(values.min()), float(values.max())
        rows.append(row)
    return pd.DataFrame(rows)


def spread(row: Mapping[str, Any], column: str, digits: int, scale: float = 1.0) -> str:
    """'mean ± std [min, max]' of a summarised column (times ``scale``)."""
    mean = row[f"{column}_mean"]
    if not np.isfinite(mean):
        return ""
    values = [scale * row[f"{column}_{k}"] for k in ("mean", "std", "min", "max")]
    return "{:.{d}f} ± {:.{d}f} [{:.{d}f}, {:.{d}f}]".format(*values, d=digits)


def step_times(models: Mapping[str, torch.nn.Module], loss: Callable[[torch.nn.Module], torch.Tensor],
               *, rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Milliseconds per training step (forward, backward, AdamW) of each model, timed side by
    side: ``rounds`` rounds of ``steps`` steps per model, interleaved; the median round.
    Interleaving is what makes them comparable on a shared machine, not the absolute values."""
    optimizers = {label: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=1e-4) for label, model in models.items()}
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                value = loss(model)
                optimizers[label].zero_grad()
                value.backward()
                optimizers[label].step()
            times[label].append((time.perf_counter() - start) / steps * 1e3)
    return {label: float(np.median(values)) for label, values in times.items()}


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a GitHub markdown table (what the docs and the README paste)."""
    cells = [[str(value) for value in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"
