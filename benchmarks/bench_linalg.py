"""Time every SVD method of spectra.core.linalg side by side on this machine.

    python benchmarks/bench_linalg.py [--threads 1,2] [--repeats 5] [--ks 8,32] [--quick]
                                      [--shapes 1024x1024x2,...]

For each shape (float32 stacks, as recorded runs store them) and need (singular values, top-k
triplets, the full reduced SVD) it times ``batched_svd(method=...)``, ``auto``, and raw
references (scipy gesdd, torch.linalg), at each thread count asked for, interleaving every
case in each repeat and keeping the minimum (the machine is shared and noisy). It prints ms
per matrix and the ratio to scipy gesdd values-only at 1 thread of the same shape: the numbers
``auto``'s rule in spectra/core/linalg.py is built on. Top-k is timed on two spectra: Gaussian
entries (a flat Marchenko–Pastur bulk, the randomized method's worst case: it gives up and
falls back) and a power law σ_i = 1/i (typical of trained weights and their updates). gesvd
with vectors is only timed where min(m, n) ≤ 128 (it is slow). The default is one thread: on a
busy 2-core machine two were many times slower. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import ThreadpoolController

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from spectra.core.linalg import batched_svd  # noqa: E402

# (m, n, B): the shapes of our runs; B keeps each call at tens of ms or more.
SHAPES = [(128, 128, 64), (512, 128, 32), (512, 784, 8), (512, 512, 8), (1024, 1024, 2)]
QUICK_SHAPES = [(128, 128, 16), (512, 128, 8)]
BLAS = ThreadpoolController()


def gaussian_stack(m: int, n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(B, m, n) float32 with N(0, 1/n) entries (an initialised layer)."""
    return (rng.standard_normal((batch, m, n)) / np.sqrt(n)).astype(np.float32)


def power_law_stack(m: int, n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(B, m, n) float32 with σ_i = 1/i and random singular vectors."""
    r = min(m, n)
    u = np.linalg.qr(rng.standard_normal((batch, m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((batch, n, r)))[0]
    return ((u / np.arange(1, r + 1)) @ v.swapaxes(1, 2)).astype(np.float32)


def scipy_gesdd_values(a: np.ndarray, threads: int) -> None:
    with BLAS.limit(limits=threads, user_api="blas"):
        for x in a:
            scipy.linalg.svd(x.astype(np.float64), compute_uv=False, check_finite=False)


def torch_values(a: np.ndarray, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.linalg.svdvals(torch.from_numpy(a).double())


def torch_full(a: np.ndarray, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.linalg.svd(torch.from_numpy(a).double(), full_matrices=False)


def ours(compute: str, method: str, k: int | None = None) -> Callable[[np.ndarray, int], object]:
    return lambda a, threads: batched_svd(a, compute=compute, method=method, k=k, threads=threads)


def cases(short: int, ks: list[int]) -> list[tuple[str, str, Callable, str]]:
    """(need, label, function(stack, threads), spectrum) for every case timed on a shape."""
    table = [
        ("values", "scipy gesdd", scipy_gesdd_values, "flat"),
        ("values", "torch svdvals", torch_values, "flat"),
        *[("values", m, ours("values", m), "flat") for m in ("gesdd", "gesvd", "gram", "auto")],
        ("full", "torch svd", torch_full, "flat"),
        *[("full", m, ours("full", m), "flat") for m in ("gesdd", "gram", "auto")],
    ]
    if short <= 128:
        table.append(("full", "gesvd", ours("full", "gesvd"), "flat"))
    for k in ks:
        for spectrum in ("flat", "1/i"):
            for method in ("gesdd", "gram", "randomized", "auto"):
                table.append((f"top{k} {spectrum}", method, ours("topk", method, k), spectrum))
    return table


def bench_shape(
    m: int, n: int, batch: int, ks: list[int], threads: list[int], repeats: int
) -> list[tuple]:
    """(need, label, ms per matrix at each thread count) for every case, min over repeats."""
    rng = np.random.default_rng(0)
    stacks = {"flat": gaussian_stack(m, n, batch, rng), "1/i": power_law_stack(m, n, batch, rng)}
    runs = [(case, count) for case in cases(min(m, n), ks) for count in threads]
    best = [float("inf")] * len(runs)
    for _ in range(repeats + 1):  # the extra pass warms caches; it counts only if fastest
        for i, ((_, _, function, spectrum), count) in enumerate(runs):
            start = time.perf_counter()
            function(stacks[spectrum], count)
            best[i] = min(best[i], time.perf_counter() - start)
    per_case = len(threads)
    return [
        (need, label, [1e3 * t / batch for t in best[i : i + per_case]])
        for i, ((need, label, _, _), _) in list(enumerate(runs))[::per_case]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (min is kept)")
    parser.add_argument("--ks", default="8,32", help="comma-separated k for top-k")
    parser.add_argument("--quick", action="store_true", help="two small shapes, 2 repeats")
    parser.add_argument("--shapes", help="comma-separated MxNxB, e.g. 1024x1024x2")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
    repeats = 2 if args.quick else args.repeats
    ks = [int(k) for k in args.ks.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"{os.cpu_count()} CPUs; threads = BLAS threads (numpy/scipy OpenBLAS) and torch "
        f"threads; min of {repeats} interleaved repeats; float32 input; ms per matrix and "
        "ratio to scipy gesdd values-only at 1 thread"
    )
    for m, n, batch in shapes:
        rows = bench_shape(m, n, batch, [k for k in ks if 4 * k <= min(m, n)], threads, repeats)
        base = rows[0][2][0]
        print(f"\n{m}x{n}  B={batch}  (scipy gesdd values, 1 thread: {base:.2f} ms/matrix)")
        header = "".join(f"{f'{count} thread(s)':>22}" for count in threads)
        print(f"  {'need':<12} {'method':<14}{header}")
        for need, label, times in rows:
            cells = "".join(f"{ms:12.2f} ms {ms / base:6.2f}x" for ms in times)
            print(f"  {need:<12} {label:<14}{cells}")


if __name__ == "__main__":
    main()
