"""Training step time against torch's thread count, on an idle and on a busy machine.

    python benchmarks/bench_threads.py [--threads 1 2] [--rounds 3] [--busy-only | --idle-only]

Four workloads of spectra's training paths: the demo GPT (d=128, 4 layers, batch 32×128), the
demo MLP (784-512-512-10, batch 64), a digits-sized MLP (64-128-128-10, batch 64) and the
theory suite's deep linear net (D = 3, width 32, full batch of 1000, float64). Each is timed at
every thread count, round by round in rotating order, first with nothing else started by the
benchmark ("idle": whatever else runs on the machine still runs) and then "busy": one process
per core spinning in a Python loop, the situation of a shared machine. Prints the median
milliseconds per step and each count's ratio to the fastest one under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from spectra.core.threads import torch_threads
from spectra.methods.theory.linear_nets import DeepLinearNet
from spectra.tasks.models import GPT, MLP, GPTConfig

Step = Callable[[], None]


def gpt_step() -> tuple[Step, int]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=80))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(80, (32, 128)), torch.randint(80, (32, 128))

    def step() -> None:
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step, 4


def mlp_step(sizes: tuple[int, ...]) -> Callable[[], tuple[Step, int]]:
    def build() -> tuple[Step, int]:
        torch.manual_seed(0)
        model = MLP(sizes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.rand(64, sizes[0]), torch.randint(sizes[-1], (64,))

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step, 40 if sizes[0] > 100 else 200
    return build


def linear_step() -> tuple[Step, int]:
    torch.manual_seed(0)
    net = DeepLinearNet(dim=8, width=32, depth=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(1000, 8, dtype=torch.float64)
    target = torch.randn(8, 8, dtype=torch.float64)

    def step() -> None:
        loss = 0.5 * (net(x) - x @ target.T).pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step, 400


WORKLOADS = {"demo GPT": gpt_step, "demo MLP 784-512-512-10": mlp_step((784, 512, 512, 10)),
             "digits MLP 64-128-128-10": mlp_step((64, 128, 128, 10)),
             "deep linear net D=3": linear_step}


def seconds_per_step(step: Step, steps: int, threads: int) -> float:
    with torch_threads(threads):
        step()  # warm-up at this thread count
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def busy_cores(busy: bool) -> Iterator[None]:
    """One spinning Python process per core while the block runs (nothing when not ``busy``)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 1)] if busy else []
    try:
        time.sleep(0.5 if busy else 0)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    loads = parser.add_mutually_exclusive_group()
    loads.add_argument("--busy-only", action="store_true")
    loads.add_argument("--idle-only", action="store_true")
    args = parser.parse_args()
    conditions = [c for c in ("idle", "busy") if not (c == "idle" and args.busy_only)
                  and not (c == "busy" and args.idle_only)]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, default {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.1f} at start; {args.rounds} rounds")
    print(f"{'workload':<26}{'load':<6}" + "".join(f"{f'{t} thr ms':>11}{'ratio':>7}"
                                                   for t in args.threads))
    for name, build in WORKLOADS.items():
        step, steps = build()
        for condition in conditions:
            times: dict[int, list[float]] = {t: [] for t in args.threads}
            with busy_cores(condition == "busy"):
                for round_ in range(args.rounds):
                    shift = round_ % len(args.threads)
                    for threads in args.threads[shift:] + args.threads[:shift]:
                        times[threads].append(seconds_per_step(step, steps, threads))
            medians = {t: statistics.median(v) for t, v in times.items()}
            best = min(medians.values())
            print(f"{name:<26}{condition:<6}" + "".join(
                f"{medians[t] * 1e3:>11.2f}{medians[t] / best:>7.2f}" for t in args.threads),
                flush=True)


if __name__ == "__main__":
    main()
