"""Importing checkpoints: time per checkpoint against the store's own writing, and peak memory
at N and 4·N checkpoints, in one run.

    python benchmarks/bench_import.py [--checkpoints 6] [--width 1024] [--matrices 8] [--rounds 3]

Each checkpoint holds ``matrices`` float32 (width, width) matrices. Three settings, interleaved
round by round in rotating order so that load from other processes hits them alike:
- ``writer``: RunWriter alone (create_run + one append per checkpoint) from matrices already in
  memory, the cost every store pays;
- ``safetensors`` and ``torch``: spectra.import_checkpoints of the same checkpoints saved by
  safetensors.torch.save_file and torch.save.
Each prints the median seconds per checkpoint of its rounds and its ratio to ``writer``. Peak
memory: VmHWM of a fresh process importing N and 4·N safetensors checkpoints (glibc's mmap
threshold fixed, so that freed matrices are returned to the OS and the peak is what is held).
Goals (set here; issue 16 asks for bounded memory): import ≤ 1.5× the writer's time, since reading
a checkpoint should cost little beside writing it; peak memory at 4·N ≤ the peak at N plus half
a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import spectra
from spectra.store import MatrixSpec, create_run

REPO = Path(__file__).resolve().parents[1]
# VmHWM, the child's own peak RSS (ru_maxrss would also count this process's RSS at the fork)
_CHILD = ("import sys, spectra; spectra.import_checkpoints(sys.argv[1:-1], sys.argv[-1], "
          "quiet=True); print(next(line.split()[1] for line in open('/proc/self/status') "
          "if line.startswith('VmHWM')))")


def write_checkpoints(folder: Path, count: int, width: int, matrices: int) -> list[dict]:
    """``count`` checkpoints of a random walk, as safetensors and torch files; their states."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(width, width, generator=gen) for i in range(matrices)}
    states = []
    for k in range(count):
        state = {n: w + 0.01 * torch.randn(w.shape, generator=gen) for n, w in state.items()}
        save_file(state, folder / f"step_{k}.safetensors")
        torch.save(state, folder / f"step_{k}.pt")
        states.append({n: w.numpy() for n, w in state.items()})
    return states


def time_writer(states: list[dict], store: Path) -> float:
    start = time.perf_counter()
    specs = [MatrixSpec(n, w.shape, w.shape, "matrix", "float32") for n, w in states[0].items()]
    writer = create_run(store, specs, states[0])
    for k, state in enumerate(states):
        writer.append(k, state)
    return (time.perf_counter() - start) / len(states)


def time_import(folder: Path, suffix: str, count: int, store: Path) -> float:
    start = time.perf_counter()
    spectra.import_checkpoints([folder / f"step_{k}{suffix}" for k in range(count)], store,
                               quiet=True)
    return (time.perf_counter() - start) / count


def peak_kb(folder: Path, count: int, store: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    paths = [str(folder / f"step_{k}.safetensors") for k in range(count)]
    out = subprocess.run([sys.executable, "-c", _CHILD, *paths, str(store)], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--matrices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        states = write_checkpoints(folder, 4 * args.checkpoints, args.width, args.matrices)
        checkpoint_mb = sum(w.nbytes for w in states[0].values()) / 2**20
        n = args.checkpoints
        runs = {
            "writer": lambda store: time_writer(states[:n], store),
            "safetensors": lambda store: time_import(folder, ".safetensors", n, store),
            "torch": lambda store: time_import(folder, ".pt", n, store),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            names = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for name in names:
                times[name].append(runs[name](folder / f"{name}-{r}.zarr"))
        base = statistics.median(times["writer"])
        print(f"{n} checkpoints of {args.matrices} x ({args.width}, {args.width}) float32 "
              f"({checkpoint_mb:.0f} MB each), median of {args.rounds} interleaved rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<12} {median:7.3f} s/checkpoint  {median / base:5.2f}x the writer  "
                  f"({checkpoint_mb / median:5.1f} MB/s)")
        few = peak_kb(folder, n, folder / "peak-n.zarr")
        many = peak_kb(folder, 4 * n, folder / "peak-4n.zarr")
        print(f"  peak memory, safetensors: {few / 1024:.0f} MB at {n} checkpoints, "
              f"{many / 1024:.0f} MB at {4 * n} ({(many - few) / 1024:+.1f} MB; one checkpoint "
              f"is {checkpoint_mb:.0f} MB)")


if __name__ == "__main__":
    main()
