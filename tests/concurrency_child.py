"""Child processes for the concurrent-analysis tests.

    python concurrency_child.py write STORE SNAPSHOTS DONE   append snapshots slowly, then touch DONE
    python concurrency_child.py analyze STORE OUT DONE       analyze() until DONE exists, once more
                                                             after; write the last two frames to OUT
"""

import sys
import time
from pathlib import Path

import numpy as np

from spectra.analysis.analyzer import analyze
from spectra.store import resume_run

SHAPES = {"a": (48, 32), "b": (32, 64), "c": (40, 40), "head": (2, 40)}


def snapshot(step):
    """Deterministic weights of snapshot ``step``."""
    rng = np.random.default_rng(step + 1)
    return {name: (np.full(shape, 0.1) + 0.05 * (step + 1) * rng.standard_normal(shape))
            .astype(np.float32) for name, shape in SHAPES.items()}


def write(store, snapshots, done):
    writer = resume_run(store)
    for step in range(writer.length, snapshots):
        writer.append(step, snapshot(step))
        time.sleep(0.05)
    Path(done).touch()


def analyze_until(store, out, done):
    frames = []
    while True:
        finished = Path(done).exists()
        frames = frames[-1:] + [analyze(store, k=4, quiet=True, max_bytes=60_000)]
        if finished:
            break
    for name, frame in zip(("during", "final"), frames[-2:] if len(frames) > 1 else frames * 2):
        frame.to_pickle(f"{out}.{name}.pkl")


if __name__ == "__main__":
    mode, store, *rest = sys.argv[1:]
    if mode == "write":
        write(store, int(rest[0]), rest[1])
    else:
        analyze_until(store, *rest)
