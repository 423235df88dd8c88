"""Recording overhead: the demo GPT trained without and with a Recorder, in one run.

    python benchmarks/bench_record.py [--steps 60] [--rounds 3]

The three settings (no recording, every=10, every=1) are interleaved round by round, in rotating
order, so that load from other processes hits all of them alike; each prints the median step time of its rounds
and its ratio to the baseline. Write throughput is measured inside the writer thread: bytes of
weights committed per second spent in RunWriter.append (float32 bytes of W_t, and bytes on disk).
Goal (issue 2): ≤ 5% overhead at every=10.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spectra.tasks.data import CharCorpus, kjv_text
from spectra.tasks.models import GPT, GPTConfig
from spectra.capture.recorder import Recorder
from spectra.store import RunWriter
from spectra.tasks.loops import GPTTraining, train_char_gpt


class AppendTimer:
    """Wraps RunWriter.append to total its time and the float32 bytes it commits."""

    def __init__(self):
        self.seconds = 0.0
        self.bytes = 0
        self._original = RunWriter.append

    def __enter__(self):
        timer = self

        def timed(writer, step, weights, *args, **kwargs):
            start = time.perf_counter()
            timer._original(writer, step, weights, *args, **kwargs)
            timer.seconds += time.perf_counter() - start
            timer.bytes += sum(w.size * 4 for w in weights.values())

        RunWriter.append = timed
        return self

    def __exit__(self, *exc):
        RunWriter.append = self._original


def time_block(corpus: CharCorpus, steps: int, every: int | None, folder: Path, seed: int) -> float:
    """Mean seconds per training step over ``steps`` steps (recording with ``every``, or not)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size))
    training = GPTTraining(steps=steps, eval_every=10**9, eval_batches=1, seed=seed)
    if every is None:
        start = time.perf_counter()
        train_char_gpt(model, corpus, training, quiet=True)
        return (time.perf_counter() - start) / steps
    with Recorder(model, folder / f"every{every}-{seed}.zarr", every=every) as rec:
        start = time.perf_counter()
        train_char_gpt(model, corpus, training, quiet=True,
                       after_step=lambda step, loss: rec.step(loss=loss))
        elapsed = time.perf_counter() - start
    return elapsed / steps


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per block")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    corpus = CharCorpus(kjv_text())
    settings = {"no recording": None, "every=10": 10, "every=1": 1}
    times: dict[str, list[float]] = {name: [] for name in settings}
    timers = {name: AppendTimer() for name in settings if settings[name]}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp) / name.replace(" ", "_") for name in settings}
        time_block(corpus, 5, None, Path(tmp), seed=99)  # warm-up
        names = list(settings)
        for round_ in range(args.rounds):
            order = names[round_ % 3:] + names[:round_ % 3]  # rotate: no setting always first
            for name in order:
                every = settings[name]
                folders[name].mkdir(exist_ok=True)
                if every is None:
                    times[name].append(time_block(corpus, args.steps, None, folders[name], round_))
                    continue
                with timers[name]:
                    times[name].append(time_block(corpus, args.steps, every, folders[name], round_))
        disk = {name: disk_bytes(folders[name]) for name in timers}

    base = statistics.median(times["no recording"])
    print(f"demo GPT (d=128, 4 layers, batch 32×128), {args.steps} steps × {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setting':<14}{'ms/step':>10}{'ratio':>8}{'write MB/s':>12}{'disk MB/s':>11}")
    for name in settings:
        median = statistics.median(times[name])
        line = f"{name:<14}{median * 1e3:>10.1f}{median / base:>8.3f}"
        if name in timers:
            timer = timers[name]
            line += f"{timer.bytes / timer.seconds / 1e6:>12.0f}{disk[name] / timer.seconds / 1e6:>11.0f}"
        print(line)


if __name__ == "__main__":
    main()
