"""Recorded training runs of the demo tasks with any method: `spectra train` and the studies.

- ``gpt_run``: the character GPT (d=128, 4 layers) on the KJV text; bits per character.
- ``mlp_run``: a 784-512-512-10 MLP on MNIST-5k; test accuracy.

Each records its run (effective weights, the method's scalars, the training loss) into a store,
writes the evaluation history into the store's attrs, and returns a RunResult. Each trains with
``threads`` torch threads (spectra.core.threads; None leaves torch's setting alone).

A method that converts chosen layers (its factory takes ``layers``) converts its own default
choice on the GPT (InRank: the feed-forward layers) and the hidden layers on the MLP (all but
the 10-way output layer, whose rank is at most 10); ``options["layers"]`` overrides both.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.core.threads import TRAINING_THREADS, torch_threads
from spectra.tasks.data import CharCorpus, kjv_text, mnist5k
from spectra.methods import Method, build_method
from spectra.methods.registry import METHODS
from spectra.tasks.models import GPT, MLP, GPTConfig
from spectra.capture.recorder import Recorder
from spectra.capture.schedules import Every, LogSpaced
from spectra.store import annotate_run
from spectra.tasks.loops import ClassifierTraining, GPTTraining, train_char_gpt, train_classifier


@dataclass
class RunResult:
    """What a recorded run ended with. ``history``: the loop's evaluations (list of dicts);
    ``scalars``: the method's last scalars; ``seconds``: wall time of training alone."""

    path: Path
    method: str
    history: list[dict]
    scalars: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1]


def gpt_run(method: str, path: str | Path, *, training: GPTTraining | None = None,
            options: dict[str, Any] | None = None, schedule: Any = None,
            quiet: bool = False, threads: int | None = TRAINING_THREADS,
            overwrite: bool = False) -> RunResult:
    """Train the demo character GPT with ``method``, recording into ``path`` (a run store
    already there is resumed, or replaced with ``overwrite``: the Recorder's)."""
    training = training or GPTTraining()
    options = dict(options or {})
    with torch_threads(threads):
        corpus = CharCorpus(kjv_text())
        torch.manual_seed(training.seed)
        model = GPT(GPTConfig(vocab_size=corpus.vocab_size))
        built = build_method(method, model, lr=training.lr, weight_decay=training.weight_decay,
                             total_steps=training.steps, **options)
        schedule = schedule or LogSpaced(per_decade=5, max_every=max(1, training.steps // 15))
        config = {"task": "char-gpt", "method": method, "options": options, **vars(training)}
        return _recorded(built, path, schedule, config, quiet, overwrite,
                         lambda after: train_char_gpt(built.model, corpus, training, quiet=quiet,
                                                      optimizer=built.optimizer,
                                                      after_step=after, threads=None))


def mlp_run(method: str, path: str | Path, *, training: ClassifierTraining | None = None,
            options: dict[str, Any] | None = None, every: int | None = None,
            quiet: bool = False, threads: int | None = TRAINING_THREADS,
            overwrite: bool = False) -> RunResult:
    """Train the 784-512-512-10 MLP on MNIST-5k with ``method``, recording into ``path``
    (every epoch by default; ``overwrite`` as for gpt_run)."""
    training = training or ClassifierTraining(epochs=30)
    options = dict(options or {})
    with torch_threads(threads):
        data = mnist5k(seed=training.seed)
        torch.manual_seed(training.seed)
        model = MLP((784, 512, 512, 10))
        if "layers" in inspect.signature(method_factory(method)).parameters:
            options.setdefault("layers", ",".join(f"layers.{i}"
                                                  for i in range(len(model.layers) - 1)))
        steps_per_epoch = -(-len(data.y_train) // training.batch_size)
        built = build_method(method, model, lr=training.lr, weight_decay=training.weight_decay,
                             total_steps=training.epochs * steps_per_epoch, **options)
        config = {"task": "mnist5k-mlp", "method": method, "options": options,
                  "steps_per_epoch": steps_per_epoch, **vars(training)}
        return _recorded(built, path, Every(every or steps_per_epoch), config, quiet, overwrite,
                         lambda after: train_classifier(built.model, data, training, quiet=quiet,
                                                        optimizer=built.optimizer,
                                                        after_step=after, threads=None))


def method_factory(method: str) -> Callable[..., Method]:
    """The function METHODS registers for ``method`` (a clear error for an unknown name)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; accepted: {sorted(METHODS)}")
    module, function = METHODS[method].split(":")
    return getattr(importlib.import_module(module), function)


def _recorded(built: Method, path: str | Path, schedule: Any, config: dict, quiet: bool,
              overwrite: bool, train: Any) -> RunResult:
    last: dict[str, float] = {}
    with Recorder(built.model, path, schedule=schedule, config=config,
                  overwrite=overwrite) as rec:
        def after(step: int, loss: float) -> None:
            last.update(built.after_step(step))
            rec.step(loss=loss, **last)

        start = time.perf_counter()
        history = train(after)
        seconds = time.perf_counter() - start
        rec.snapshot(**last)
    annotate_run(path, history=history, seconds=seconds)
    return RunResult(Path(path), built.name, history, last, seconds)
