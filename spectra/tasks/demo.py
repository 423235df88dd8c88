"""`spectra demo`: train the character GPT on the KJV text and an MLP on MNIST-5k, recording
both, then analyze the stores and draw their figures. Training uses ``threads`` torch threads
(spectra.core.threads; None leaves torch's setting alone)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectra import plot
from spectra.analysis.analyzer import analyze
from spectra.core.threads import TRAINING_THREADS
from spectra.tasks.data import CharCorpus, kjv_text, mnist5k
from spectra.tasks.models import GPT, MLP, GPTConfig
from spectra.capture.recorder import Recorder
from spectra.capture.schedules import LogSpaced
from spectra.tasks.loops import ClassifierTraining, GPTTraining, train_char_gpt, train_classifier


@dataclass
class DemoRuns:
    gpt: Path
    mlp: Path
    figures: list[Path] = field(default_factory=list)


def record_gpt(path: Path, training: GPTTraining, *, seed: int = 0, quiet: bool = False,
               schedule: object = None, threads: int | None = TRAINING_THREADS) -> list[dict]:
    """Train the demo character GPT (d=128, 4 layers) on the KJV text, recording into ``path``."""
    corpus = CharCorpus(kjv_text())
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size))
    schedule = schedule or LogSpaced(per_decade=10, max_every=max(1, training.steps // 12))
    config = {"task": "char-gpt", "corpus": "kjv", **vars(training), **vars(model.config)}
    with Recorder(model, path, schedule=schedule, config=config) as rec:
        history = train_char_gpt(model, corpus, training, quiet=quiet, threads=threads,
                                 after_step=lambda step, loss: rec.step(loss=loss))
        rec.snapshot()
    return history


def record_mlp(path: Path, training: ClassifierTraining, *, seed: int = 0,
               quiet: bool = False, every: int = 20,
               threads: int | None = TRAINING_THREADS) -> list[dict]:
    """Train a 784-512-512-10 MLP on MNIST-5k, recording into ``path`` every ``every`` steps."""
    data = mnist5k(seed=seed)
    torch.manual_seed(seed)
    model = MLP((784, 512, 512, 10))
    config = {"task": "mnist5k-mlp", **vars(training)}
    with Recorder(model, path, every=every, config=config) as rec:
        history = train_classifier(model, data, training, quiet=quiet, threads=threads,
                                   after_step=lambda step, loss: rec.step(loss=loss))
        rec.snapshot()
    return history


def run_demo(out: Path, figures: Path, *, quick: bool = False, quiet: bool = False,
             threads: int | None = TRAINING_THREADS) -> DemoRuns:
    """Record both demo runs into ``out`` (replacing earlier demo stores), analyze them and
    write their figures into ``figures``."""
    runs = DemoRuns(gpt=out / "demo-gpt.zarr", mlp=out / "demo-mlp.zarr")
    for path in (runs.gpt, runs.mlp):
        shutil.rmtree(path, ignore_errors=True)
    gpt = GPTTraining(steps=60 if quick else 600, eval_every=30 if quick else 100,
                      eval_batches=4 if quick else 20)
    mlp = ClassifierTraining(epochs=1 if quick else 10)
    say = (lambda *a: None) if quiet else print
    say(f"training the character GPT for {gpt.steps} steps → {runs.gpt}")
    history = record_gpt(runs.gpt, gpt, quiet=quiet, threads=threads)
    say(f"  validation {history[-1]['val_bpc']:.3f} bits/char after {history[-1]['seconds']:.0f} s")
    say(f"training the MNIST MLP for {mlp.epochs} epochs → {runs.mlp}")
    history = record_mlp(runs.mlp, mlp, quiet=quiet, threads=threads)
    say(f"  test accuracy {history[-1]['test_accuracy']:.3f} after {history[-1]['seconds']:.0f} s")
    for path in (runs.gpt, runs.mlp):
        say(f"analyzing {path}")
        frame = analyze(path, quiet=quiet)
        runs.figures.extend(plot.run_figures(frame, figures, path.stem))
    return runs
