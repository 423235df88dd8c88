"""analyze() against a plain numpy loop, the LAPACK bound, and its memory as the run grows.

    python benchmarks/bench_analyze.py [--snapshots 20]

On a store shaped like the demo GPT's (17 matrices: 4 × (384×128, 128×128, 512×128, 128×512)
+ 73×128, float32 weights drifting from a random start), in one run:

1. analyze(k=8) (all metrics, subspaces included) vs a plain per-matrix loop computing the same
   metrics with numpy (np.linalg.svd of each matrix read from the store, then each metric).
   Goal ≥ 2× faster.
2. analyze(k=0) (values-only metrics) vs the bare LAPACK bound: scipy gesdd values-only on the
   same matrices already in memory. Goal within 1.3×.
3. Peak memory of analyze() (fresh process each) on a store of N and of 10·N snapshots.
   Goal: 10·N < 1.2 × N.
Times are the minimum of interleaved repeats (the machine is shared and noisy), every
contestant under the same one-thread BLAS limit (the measured best here; with two threads on a
busy 2-core machine every BLAS call slows down many-fold, which would flatter analyze()).
N defaults to 40, more than one chunk of snapshots at analyze()'s default memory budget, so
both stores are processed in full-size chunks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg

from spectra.core.linalg import blas_threads

SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512)] * 4 + [(73, 128)]


def make_store(path: Path, snapshots: int, seed: int = 0) -> None:
    """A demo-GPT-shaped store whose weights take a random walk with a low-rank drift."""
    from spectra.store import MatrixSpec, create_run
    rng = np.random.default_rng(seed)
    names = [f"m{i}.weight" for i in range(len(SHAPES))]
    specs = [MatrixSpec(n, s, s, "linear") for n, s in zip(names, SHAPES)]
    w = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in zip(names, SHAPES)}
    drift = {n: rng.standard_normal((s[0], 4)) @ rng.standard_normal((4, s[1])) * 1e-3
             for n, s in zip(names, SHAPES)}
    writer = create_run(path, specs, w)
    for t in range(snapshots):
        w = {n: (v + drift[n] + 1e-3 * rng.standard_normal(v.shape)).astype(np.float32)
             for n, v in w.items()}
        writer.append(t, w)


def plain_loop(path: Path, k: int = 8) -> int:
    """What a user would write: one float64 SVD per matrix and target, metrics one by one."""
    from spectra.store import open_run
    run = open_run(path)
    rows = 0
    for name in run.params:
        for target in ("updates", "weights"):
            previous = last = None
            read = run.updates if target == "updates" else run.weights
            u_last, _, vh_last = np.linalg.svd(read(name, len(run) - 1).astype(np.float64),
                                               full_matrices=False)
            for t in range(len(run)):
                a = read(name, t).astype(np.float64)
                u, s, vh = np.linalg.svd(a, full_matrices=False)
                p = s[s > 0] / s.sum() if s[0] > 0 else np.ones(1)
                metrics = [np.exp(-(p * np.log(p)).sum()), (s**2).sum() / max(s[0] ** 2, 1e-300),
                           (s > max(a.shape) * np.finfo(np.float32).eps * s[0]).sum(),
                           np.searchsorted(np.cumsum(s**2) / max((s**2).sum(), 1e-300), 0.9) + 1,
                           np.linalg.norm(s), s[0], s.sum(), s[0] / s[-1] if s[-1] else np.inf]
                g = 1 - np.array([np.var(np.where(np.arange(len(s)) >= j, s, 0)) for j in
                                  range(1, len(s) + 1)]) / max(np.var(s), 1e-300)
                metrics.append(np.argmax(g > 0.9) + 1)
                for ref_u, ref_vh in ((previous or (u, vh)), (u_last, vh_last)):
                    for x, y in ((ref_u[:, :k], u[:, :k]), (ref_vh[:k].T, vh[:k].T)):
                        cos = np.linalg.svd(x.T @ y, compute_uv=False)
                        metrics += [(cos**2).sum() / k, np.arccos(min(1.0, cos[-1]))]
                    metrics.append(np.trace((ref_u.T @ u) @ (vh @ ref_vh.T)) / len(s))
                previous = (u, vh)
                rows += len(metrics)
    return rows


def lapack_bound(path: Path) -> float:
    """Seconds for scipy gesdd values-only on every matrix (both targets), already in memory."""
    from spectra.store import open_run
    run = open_run(path)
    stacks = [m for name in run.params for m in
              (run.updates(name).astype(np.float32), run.weights(name))]
    start = time.perf_counter()
    for stack in stacks:
        for a in stack:
            scipy.linalg.svd(a.astype(np.float64), compute_uv=False, lapack_driver="gesdd",
                             check_finite=False, overwrite_a=True)
    return time.perf_counter() - start


def timed_analyze(path: Path, k: int) -> float:
    from spectra.analysis.analyzer import analyze
    shutil.rmtree(path / "analysis", ignore_errors=True)
    start = time.perf_counter()
    analyze(path, k=k, quiet=True)
    return time.perf_counter() - start


def child_peak(path: Path) -> dict:
    """Run analyze in a fresh process; peak memory allocated during it (tracemalloc, which
    numpy reports its arrays to), in MB."""
    code = (
        "import json, shutil, tracemalloc\n"
        "from spectra.analysis.analyzer import analyze\n"
        f"shutil.rmtree({str(path / 'analysis')!r}, ignore_errors=True)\n"
        "tracemalloc.start()\n"
        f"frame = analyze({str(path)!r}, k=8, quiet=True)\n"
        "peak = tracemalloc.get_traced_memory()[1]\n"
        "print(json.dumps({'peak_mb': peak / 2**20, 'rows': len(frame)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=40, help="N")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "n.zarr", Path(tmp) / "10n.zarr"
        make_store(small, args.snapshots)
        make_store(large, 10 * args.snapshots)
        times = {"analyze k=8": [], "plain numpy loop": [], "analyze k=0": [], "gesdd bound": []}
        with blas_threads(1):
            for _ in range(args.repeats):
                times["analyze k=8"].append(timed_analyze(small, 8))
                start = time.perf_counter()
                plain_loop(small)
                times["plain numpy loop"].append(time.perf_counter() - start)
                times["analyze k=0"].append(timed_analyze(small, 0))
                times["gesdd bound"].append(lapack_bound(small))
        best = {name: min(values) for name, values in times.items()}
        peaks = {"N": child_peak(small), "10N": child_peak(large)}

    matrices = 2 * len(SHAPES) * args.snapshots
    print(f"store: {len(SHAPES)} demo-GPT-shaped matrices × {args.snapshots} snapshots × 2 targets "
          f"= {matrices} SVDs; min of {args.repeats} repeats")
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds:7.2f} s  ({seconds / matrices * 1e3:.2f} ms per matrix)")
    print(f"  all metrics: plain loop / analyze = "
          f"{best['plain numpy loop'] / best['analyze k=8']:.2f}×   (goal ≥ 2)")
    print(f"  values only: analyze / gesdd bound = "
          f"{best['analyze k=0'] / best['gesdd bound']:.2f}×   (goal ≤ 1.3)")
    grow = {k: v["peak_mb"] for k, v in peaks.items()}
    print(f"  peak memory of analyze(k=8): N {grow['N']:.0f} MB, 10N {grow['10N']:.0f} MB; "
          f"ratio {grow['10N'] / grow['N']:.2f}   (goal < 1.2; frame rows {peaks['N']['rows']} "
          f"and {peaks['10N']['rows']})")


if __name__ == "__main__":
    main()
