"""spectra at GPT-2-small scale: recording, store size, and analyze() against its bounds.

    python benchmarks/bench_scale.py [--blocks 1] [--snapshots 16] [--workers 2] [--out DIR]

Builds a store shaped like GPT-2 small's transformer blocks (per block q, k, v, o 768×768, fc
3072×768, proj 768×3072: 72 matrices for 12 blocks, 85M weights) with a Recorder, the weights
taking a random walk with a low-rank drift, and prints in one run:

1. store bytes per snapshot against the raw float32 weights, and the writer's throughput;
2. on the same snapshots, both targets, every contestant under one BLAS thread, cold caches:
   the values-only bound (scipy gesdd on the matrices already in memory: sgesdd on float32, as
   issue 14 measured it, and dgesdd on float64), analyze(k=0) and a plain numpy loop computing
   the same values-only metrics from the store, analyze(k=8) and a plain numpy loop computing
   every k=8 metric (benchmarks/bench_analyze.py's), and analyze(k=8) on a local dask cluster of
   ``--workers`` single-threaded workers (started before the clock: startup is printed apart);
   on a machine with CUDA also analyze(k=8, device="cuda");
3. peak memory allocated by analyze(k=8) in a fresh process (tracemalloc);
4. the goals of issue 14, with the full store (12 blocks × 100 snapshots × 2 targets)
   extrapolated linearly from the measured fraction (every snapshot costs the same: nothing is
   decomposed twice).

A full store is ~28 GB and hours of CPU; ``--blocks`` and ``--snapshots`` measure a fraction.
Contestants run in rotated order over ``--repeats`` rounds; the minimum is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_analyze import plain_loop  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.capture.recorder import Recorder  # noqa: E402
from spectra.core.linalg import blas_threads  # noqa: E402
from spectra.store import RunWriter, open_run  # noqa: E402

FULL_BLOCKS, FULL_SNAPSHOTS = 12, 100
D = 768


class Blocks(nn.Module):
    """GPT-2 small's block matrices, (out, in) as nn.Linear stores them."""

    def __init__(self, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            **{name: nn.Linear(D, D, bias=False) for name in ("q", "k", "v", "o")},
            "fc": nn.Linear(D, 4 * D, bias=False), "proj": nn.Linear(4 * D, D, bias=False),
        }) for _ in range(blocks))


def record(path: Path, blocks: int, snapshots: int, seed: int = 0) -> dict:
    """Record W_0 and ``snapshots`` steps of a random walk with a rank-4 drift; the writer's
    time and bytes (float32 weights committed per second inside RunWriter.append)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Blocks(blocks)
    weights = [p for p in model.parameters()]
    drift = [0.02 * torch.randn(w.shape[0], 4, generator=generator)
             @ torch.randn(4, w.shape[1], generator=generator) / D for w in weights]
    timer = {"seconds": 0.0, "bytes": 0}
    original = RunWriter.append

    def timed(writer, step, matrices, *args, **kwargs):
        start = time.perf_counter()
        original(writer, step, matrices, *args, **kwargs)
        timer["seconds"] += time.perf_counter() - start
        timer["bytes"] += sum(m.size * 4 for m in matrices.values())

    RunWriter.append = timed
    try:
        with Recorder(model, path, every=1) as rec, torch.no_grad():
            for _ in range(snapshots):
                for w, d in zip(weights, drift):
                    w += d + 2e-4 * torch.randn(w.shape, generator=generator)
                rec.step()
    finally:
        RunWriter.append = original
    raw = sum(w.numel() * 4 for w in weights)
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "/updates/" in str(f))
    return {"raw_per_snapshot": raw, "stored_per_snapshot": stored / snapshots,
            "write_mb_s": timer["bytes"] / timer["seconds"] / 1e6}


def bound(run, dtype) -> float:
    """Seconds of scipy gesdd values-only on every matrix of both targets, held in memory."""
    stacks = [stack.astype(dtype) for name in run.params
              for stack in (run.updates(name), run.weights(name))]
    start = time.perf_counter()
    for stack in stacks:
        for a in stack:
            scipy.linalg.svd(a, compute_uv=False, lapack_driver="gesdd", check_finite=False)
    return time.perf_counter() - start


def values_loop(path: Path) -> float:
    """A plain numpy loop computing the values-only metrics, reading the store."""
    run = open_run(path)
    start = time.perf_counter()
    for name in run.params:
        for read in (run.updates, run.weights):
            for t in range(len(run)):
                a = read(name, t).astype(np.float64)
                s = np.linalg.svd(a, compute_uv=False)
                p = s[s > 0] / s.sum() if s[0] > 0 else np.ones(1)
                [np.exp(-(p * np.log(p)).sum()), (s**2).sum() / max(s[0] ** 2, 1e-300),
                 (s > max(a.shape) * np.finfo(np.float32).eps * s[0]).sum(),
                 np.searchsorted(np.cumsum(s**2) / max((s**2).sum(), 1e-300), 0.9) + 1,
                 np.linalg.norm(s), s[0], s.sum(), s[0] / s[-1] if s[-1] else np.inf]
    return time.perf_counter() - start


def timed_analyze(path: Path, cache: Path, **kwargs) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    analyze(path, quiet=True, cache=cache, **kwargs)
    return time.perf_counter() - start


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def peak_memory(path: Path, cache: Path) -> float:
    """Peak memory allocated while analyze(k=8) runs in a fresh process, MB (tracemalloc,
    which numpy reports its arrays to)."""
    code = (
        "import json, shutil, sys, tracemalloc\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from spectra.analysis.analyzer import analyze\n"
        f"shutil.rmtree({str(cache)!r}, ignore_errors=True)\n"
        "tracemalloc.start()\n"
        f"analyze({str(path)!r}, k=8, quiet=True, cache={str(cache)!r})\n"
        "print(json.dumps(tracemalloc.get_traced_memory()[1] / 2**20))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--snapshots", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="folder for the store (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.out))
    try:
        run_benchmark(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, folder: Path) -> None:
    from distributed import Client, LocalCluster

    path, cache = folder / "gpt2.zarr", folder / "cache.zarr"
    started = time.perf_counter()
    store = record(path, args.blocks, args.snapshots)
    record_seconds = time.perf_counter() - started
    run = open_run(path)
    start = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    client.run(lambda: __import__("spectra.analysis.analyzer"))  # workers' imports, off the clock
    cluster_seconds = time.perf_counter() - start
    contestants = {
        "sgesdd values bound (float32, in memory)": lambda: bound(run, np.float32),
        "dgesdd values bound (float64, in memory)": lambda: bound(run, np.float64),
        "analyze(k=0)": lambda: timed_analyze(path, cache, k=0),
        "numpy loop, values-only metrics": lambda: values_loop(path),
        "analyze(k=8)": lambda: timed_analyze(path, cache, k=8),
        "numpy loop, every k=8 metric": lambda: timed(plain_loop, path),
        f"analyze(k=8), {args.workers} dask workers": lambda: timed_analyze(
            path, cache, k=8, client=client, threads=1),
    }
    if torch.cuda.is_available():
        contestants["analyze(k=8, device='cuda')"] = lambda: timed_analyze(path, cache, k=8,
                                                                           device="cuda")
    times = {name: [] for name in contestants}
    names = list(contestants)
    with blas_threads(1):
        for round_ in range(args.repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                times[name].append(contestants[name]())
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    client.close()
    cluster.close()
    memory = peak_memory(path, cache)
    report(args, store, record_seconds, cluster_seconds, {n: min(v) for n, v in times.items()},
           memory, run)


def report(args, store, record_seconds, cluster_seconds, best, memory, run) -> None:
    matrices = len(run.params)
    decompositions = 2 * matrices * len(run)
    scale = (FULL_BLOCKS * FULL_SNAPSHOTS) / (args.blocks * args.snapshots)
    print(f"\nstore: {args.blocks} GPT-2-small block(s) = {matrices} matrices, W_0 + "
          f"{args.snapshots} snapshots; {decompositions} decompositions per analysis (both "
          f"targets); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"min of {args.repeats} round(s)")
    print(f"  store bytes per snapshot: {store['stored_per_snapshot'] / 1e6:.1f} MB = "
          f"{store['stored_per_snapshot'] / store['raw_per_snapshot']:.2f}× the raw float32 "
          f"weights ({store['raw_per_snapshot'] / 1e6:.1f} MB)")
    print(f"  record: writer {store['write_mb_s']:.0f} MB/s of float32 weights; the whole "
          f"recording {record_seconds:.0f} s")
    print(f"  dask cluster startup ({args.workers} workers, imports): {cluster_seconds:.1f} s "
          "(not in the times below)")
    for name, seconds in best.items():
        print(f"  {name:<44} {seconds:8.1f} s  {1e3 * seconds / decompositions:7.0f} ms per "
              f"matrix   full store ≈ {seconds * scale / 60:6.1f} min")
    sbound = best["sgesdd values bound (float32, in memory)"]
    dbound = best["dgesdd values bound (float64, in memory)"]
    k8, k0 = best["analyze(k=8)"], best["analyze(k=0)"]
    workers = best[f"analyze(k=8), {args.workers} dask workers"]
    matrix_mb = 8 * 4 * D * D / 2**20
    print(f"  peak memory allocated by analyze(k=8): {memory:.0f} MB (max_bytes 256 MiB; one "
          f"float64 3072×768 matrix is {matrix_mb:.0f} MB)")
    print("goals (issue 14):")
    print(f"  analyze(k=8) / values-only bound: {k8 / sbound:.2f}× sgesdd, {k8 / dbound:.2f}× "
          "dgesdd   (goal ≤ 2)")
    print(f"  numpy loop, every k=8 metric / analyze(k=8): "
          f"{best['numpy loop, every k=8 metric'] / k8:.2f}×   (goal ≥ 3)")
    print(f"  analyze(k=0) / numpy values loop reading the store: "
          f"{k0 / best['numpy loop, values-only metrics']:.2f}×   (goal ≤ 1.0)")
    print(f"  serial / {args.workers} workers: {k8 / workers:.2f}×")
    print(f"  full GPT-2-small store (12 blocks × 100 snapshots × 2 targets), extrapolated ×"
          f"{scale:.0f}: serial {k8 * scale / 60:.0f} min, {args.workers} workers "
          f"{workers * scale / 60:.0f} min   (goal ≤ 30 min with 2 workers)")
    if "analyze(k=8, device='cuda')" in best:
        gpu = best["analyze(k=8, device='cuda')"]
        print(f"  GPU: {gpu:.1f} s, {k8 / gpu:.1f}× the CPU; full store ≈ {gpu * scale / 60:.1f} "
              "min   (goal < 5 min)")
    else:
        print("  GPU: no CUDA device here; not measured")


if __name__ == "__main__":
    main()
