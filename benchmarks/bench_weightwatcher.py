"""spectra.analyze against WeightWatcher's cheapest analyze, on the same weights.

    python benchmarks/bench_weightwatcher.py [--shapes gpt2|demo] [--blocks 2] [--snapshots 1]
                                             [--rounds 3] [--quick]

(needs ``pip install spectra-dynamics[bench]``, which installs weightwatcher.)

A model of nn.Linear layers (``gpt2``: GPT-2 small's block matrices, q, k, v, o 768×768, fc
3072×768, proj 768×3072 per block; ``demo``: the demo GPT's 17 matrices ≤ 512×128 of
benchmarks/bench_analyze.py) is recorded with a Recorder: W_0, then ``--snapshots`` − 1 steps of
a random walk, each state also kept as a model for WeightWatcher, which analyses one model at a
time. Then, over ``--rounds`` rounds in rotated order, every contestant under one BLAS thread
and one torch thread, on the weights W_t of every snapshot:

- WeightWatcher(model=m).analyze(**WW_CHEAPEST) once per snapshot's model: its cheapest
  options (no plots, no randomized ESD, no Marchenko-Pastur fit, no eigenvectors, no detX, no
  finger fixing; the power-law fit cannot be switched off). On a CPU it computes every
  singular value of each layer with scipy's float64 gesdd (values only) and squares them;
- spectra.analyze(store, targets="weights", k=0) (values-only metrics) and k=8 (every
  metric, top-8 subspaces included), cold: ``cache="memory"`` keeps nothing between calls;
- the floor: a numpy loop of np.linalg.svd(W, compute_uv=False) on the matrices in memory,
  in float32 (sgesdd) and in float64 (dgesdd, WeightWatcher's own SVD work).

Prints the medians, the ratios WeightWatcher / spectra (goal of issue 14: ≥ 5× for k=0), and
how far WeightWatcher's largest singular value of each layer is from spectra's sigma_1.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_analyze import SHAPES as DEMO_SHAPES  # noqa: E402
from bench_scale import Blocks  # noqa: E402
from spectra.analysis.analyzer import analyze  # noqa: E402
from spectra.capture.recorder import Recorder  # noqa: E402
from spectra.core.linalg import blas_threads  # noqa: E402

# WeightWatcher 0.7's analyze() options that add work beyond the ESD of each layer, all off
# (analyze's keyword defaults, spelled out so that a change of defaults cannot add work);
# fit="PL" with its own "ww" power-law package is the cheapest fit; the fit cannot be skipped.
WW_CHEAPEST = dict(plot=False, randomize=False, mp_fit=False, vectors=False, detX=False,
                   fix_fingers=False, deltas=False, intra=False, fit="PL", pl_package="ww",
                   svd_method="fast")
WW = "WeightWatcher analyze (cheapest)"
K0, K8 = "spectra analyze(k=0)", "spectra analyze(k=8)"
FLOOR32, FLOOR64 = "numpy svd values loop, float32", "numpy svd values loop, float64"


def import_weightwatcher() -> Any:
    """weightwatcher, without the warnings it logs at import (it configures the root logger
    and announces its SVD backend) nor its per-layer log lines."""
    logging.disable(logging.WARNING)
    try:
        import weightwatcher
    except ImportError:
        sys.exit("weightwatcher is not installed: pip install spectra-dynamics[bench]")
    finally:
        logging.disable(logging.NOTSET)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return weightwatcher


def build_model(shapes: str, blocks: int) -> nn.Module:
    """GPT-2 small's block matrices, or the demo GPT's; (out, in) as nn.Linear stores them."""
    if shapes == "gpt2":
        return Blocks(blocks)
    return nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in DEMO_SHAPES)


def record(model: nn.Module, path: Path, snapshots: int, seed: int = 0) -> list[nn.Module]:
    """Record W_0 and ``snapshots`` − 1 steps of a random walk into ``path``; a copy of the
    model at each recorded snapshot, for WeightWatcher."""
    generator = torch.Generator().manual_seed(seed)
    models = [copy.deepcopy(model)]
    with Recorder(model, path, every=1) as rec, torch.no_grad():
        for _ in range(snapshots - 1):
            for w in model.parameters():
                w += 2e-4 * torch.randn(w.shape, generator=generator)
            rec.step()
            models.append(copy.deepcopy(model))
    return models


def svd_loop(matrices: list[np.ndarray], dtype: type) -> None:
    for w in matrices:
        np.linalg.svd(w.astype(dtype, copy=False), compute_uv=False)


def contestants(ww: Any, models: list[nn.Module], path: Path) -> dict[str, Callable[[], Any]]:
    matrices = [p.detach().numpy() for m in models for p in m.parameters()]
    return {
        WW: lambda: [ww.WeightWatcher(model=m).analyze(**WW_CHEAPEST) for m in models],
        K0: lambda: analyze(path, targets="weights", k=0, cache="memory", quiet=True),
        K8: lambda: analyze(path, targets="weights", k=8, cache="memory", quiet=True),
        FLOOR32: lambda: svd_loop(matrices, np.float32),
        FLOOR64: lambda: svd_loop(matrices, np.float64),
    }


def run_rounds(runners: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict, dict]:
    """Seconds of each contestant per round (rotated order), and each one's last result."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    results: dict[str, Any] = {}
    names = list(runners)
    with blas_threads(1):
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start = time.perf_counter()
                results[name] = runners[name]()
                times[name].append(time.perf_counter() - start)
                print(f"  round {round_ + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    return times, results


def sigma1_difference(details: Any, frame: Any, step: int) -> float:
    """Largest relative difference between WeightWatcher's sv_max of each layer and spectra's
    sigma_1 of the same matrix at ``step``."""
    rows = frame[(frame.metric == "sigma_1") & (frame.step == step)]
    spectra_sigma = dict(zip(rows.param.astype(str), rows.value))
    ww_sigma = {f"{name}.weight": value for name, value in zip(details.longname, details.sv_max)}
    if set(ww_sigma) != set(spectra_sigma):
        raise RuntimeError(f"WeightWatcher analysed {sorted(ww_sigma)}, spectra "
                           f"{sorted(spectra_sigma)}")
    return max(abs(ww_sigma[p] / spectra_sigma[p] - 1) for p in spectra_sigma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("gpt2", "demo"), default="gpt2")
    parser.add_argument("--blocks", type=int, default=2, help="GPT-2 blocks (--shapes gpt2)")
    parser.add_argument("--snapshots", type=int, default=1, help="W_0 and the steps after it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: demo shapes, 1 snapshot, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.snapshots, args.rounds = "demo", 1, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ww = import_weightwatcher()
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "run.zarr"
        models = record(build_model(args.shapes, args.blocks), path, args.snapshots)
        times, results = run_rounds(contestants(ww, models, path), args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    step = int(results[K0].step.min())
    report(args, models, {name: statistics.median(v) for name, v in times.items()},
           sigma1_difference(results[WW][0], results[K0], step), load_before)


def report(args, models, median, sigma_diff, load_before) -> None:
    shapes = sorted({tuple(p.shape) for p in models[0].parameters()})
    matrices = sum(1 for m in models for _ in m.parameters())
    print(f"\n{args.shapes} shapes {shapes}: {matrices // len(models)} matrices × "
          f"{len(models)} snapshot(s) = {matrices} SVDs of W_t per contestant; medians of "
          f"{args.rounds} round(s); 1 BLAS thread, 1 torch thread; {os.cpu_count()} CPUs, load "
          f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    floor = median[FLOOR32]
    print(f"  {'contestant':<36} {'median s':>9} {'ms/matrix':>10} {'× floor32':>10} "
          f"{'WW / this':>10}")
    for name, seconds in median.items():
        print(f"  {name:<36} {seconds:9.2f} {1e3 * seconds / matrices:10.1f} "
              f"{seconds / floor:10.2f} {median[WW] / seconds:10.2f}")
    print(f"goal (issue 14): WeightWatcher / spectra analyze(k=0) = {median[WW] / median[K0]:.2f}×"
          f"   (goal ≥ 5); with every metric (k=8): {median[WW] / median[K8]:.2f}×")
    print(f"  WeightWatcher's sv_max vs spectra's sigma_1, W_0 of every matrix: largest relative "
          f"difference {sigma_diff:.1e}")


if __name__ == "__main__":
    main()
