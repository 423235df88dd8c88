"""Batched SVD engine: singular values and vectors of a stack of same-shape matrices.

One entry point, :func:`batched_svd`, over ``a`` of shape (B, m, n) (numpy array, torch
tensor, or a lazy array such as zarr's, read chunk by chunk; float16, bfloat16, float32 or
float64). It returns an :class:`SVD` of float64 arrays of the same kind as ``a`` (numpy in,
numpy out; torch in, torch out on ``a``'s device).

Exactness: the fastest *exact* method
-------------------------------------
"Exact" means exact to the precision the matrix was *stored* in, which is what every metric
downstream can resolve. A float32 matrix is known only up to its rounding, a perturbation of
norm ~max(m, n)·eps32·σ_1 (eps32 = 1.2e-7); that is also the default threshold of
``metrics.numerical_rank``. Every method computes in float64.

- ``gesdd`` / ``gesvd`` (LAPACK on the float64 copy): |Δσ_i| ≲ max(m, n)·eps64·σ_1 for any
  input. Exact for every dtype.
- ``gram`` (eigen-decomposition of the float64 Gram matrix G = AᵀA of the short side): for
  float32-or-lower input every product a_ki·a_kj is exact in float64, so G carries only the
  summation rounding and ``eigh``'s backward error, |Δλ| ≲ (m + n)·eps64·σ_1² at worst
  (~sqrt(m)·eps64·σ_1² typically). Hence |Δσ_i| ≲ |Δλ|/(2σ_i), and at worst sqrt(|Δλ|) ≈
  5e-7·σ_1 for m + n = 1024 — a hundred times below the float32 noise floor
  max(m, n)·eps32·σ_1 = 6e-5·σ_1 (n = 512), so exact for float32/float16/bfloat16 storage.
  For float64 storage it is *not*: σ below ~1e-8·σ_1 come out as rounding noise (a float64
  matrix with σ down to 1e-12 reports a garbage tail), so ``auto`` never uses it there.
  Vectors: V from ``eigh`` (top-k: LAPACK syevr on the k largest only); U = A·V/σ, made
  orthonormal to rounding by one Cholesky-QR pass, when every σ_i ≥ 1e-6·σ_1 (A·V/σ is then
  orthonormal to ≲ eps64·σ_1²/σ_k² ≤ 2e-4 before the pass); otherwise U is the Householder
  QR factor of A·V with column signs matched, which completes an orthonormal basis where σ
  is at or below the noise (vectors there are undetermined by the data anyway).
- ``randomized`` (top-k only): subspace iteration on a Gaussian sketch of width 2k + 10, drawn
  from ``torch.Generator().manual_seed(seed)`` and shared by all matrices (so results do not
  depend on chunking), with a Rayleigh–Ritz step after every power step. A matrix is accepted
  only when the a-posteriori residuals meet ‖A v_i − σ_i u_i‖ ≤ tol·σ_1 for all i ≤ k
  (Aᵀu_i = σ_i v_i holds by construction), which bounds |Δσ_i| ≤ tol·σ_1 and the angle of
  (u_i, v_i) by tol·σ_1 / gap_i. ``tol`` defaults to sqrt(max(m, n))·eps32 (2.7e-6 at
  512) for float32-or-lower storage — no looser for float16/bfloat16 — and to
  32·sqrt(max(m, n))·eps64 for float64, just above the rounding of the residual itself
  (randomized rarely pays off there; ``auto`` never picks it). A matrix that has not
  converged after 20 power steps, or whose residual is shrinking too slowly to get
  there, is recomputed by the exact dense method (``gram`` for float32-or-lower storage,
  else ``gesdd``): never silently approximate.

Agreement with ``scipy.linalg.svd`` on the same matrices (what the tests check): σ to
1e-12·σ_1 (gesdd, gesvd), 1e-6·σ_1 and 1e-3 of the float32 noise floor (gram), tol·σ_1
(randomized); vectors orthonormal, rebuilding A (or its best rank-k part) to 1e-9·σ_1, and
|u_iᵀ u_ref,i| ≥ 1 − 1e-9 for well-separated σ_i (1e-6 for top-k).

``method="auto"``, the rule (chosen from ``python benchmarks/bench_linalg.py``, which times every
method side by side; the figures are in docs/benchmarks.md): float64 storage → ``gesdd`` for
everything (the only exact choice). float32-or-lower storage → ``gram`` for values, full and
top-k (partial ``eigh``), except top-k with min(m, n) ≥ 1024 and sketch width 2k + 10 ≤
min(m, n)/32, where ``randomized`` wins on decaying spectra. ``device="cuda"`` runs the same
methods with torch on the GPU (``gesdd`` there means torch's default cuSOLVER driver, ``gesvd``
``driver="gesvd"``) under the same rule; it is never the default. On the CPU numpy/scipy do the
work: torch's CPU LAPACK was measured slower.

Threads: CPU "batched" SVD is a loop over LAPACK calls. During a call the engine limits the
BLAS (OpenBLAS, via threadpoolctl) to ``threads`` threads, 1 by default, and restores the
setting afterwards: on a machine that other processes keep busy, two threads made the same
calls many times *slower* (workers spin waiting for a descheduled partner; docs/benchmarks.md),
and they gain little even when it is idle.

Robustness: stacks are processed in chunks whose float64 working set stays under
``max_bytes`` (the returned arrays excluded). A matrix holding NaN/Inf gets NaN in its rows of
the result and one RuntimeWarning per call counts them. A LAPACK failure
(``LinAlgError``) or a non-finite result for a finite matrix is retried matrix by matrix down
the chain: the chosen method, ``gesdd``, ``gesvd``, then (from CUDA) CPU ``gesdd`` and
``gesvd``; all computation is already float64. Wide matrices (m < n) are transposed
internally. Zero matrices give zero singular values.

The methods themselves live in ``spectra/core/svd_methods.py``; this module plans, chunks,
converts and falls back.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from spectra.core import svd_methods as methods
from spectra.core.svd_methods import LINALG_ERRORS, Triplets, full, sketch_width
from spectra.core.metrics import storage_eps

Array = np.ndarray | torch.Tensor

COMPUTES = ("values", "topk", "full")
METHODS = ("auto", "gesdd", "gesvd", "gram", "randomized")

_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
# auto uses randomized top-k when min(m, n) ≥ this and the sketch is ≤ 1/32 of it (benchmark).
_RANDOMIZED_MIN_SHORT_SIDE = 1024
_RANDOMIZED_MAX_SKETCH_FRACTION = 1 / 32


@dataclass(frozen=True)
class SVD:
    """Result of :func:`batched_svd`, float64, same array kind and device as the input.

    S:  (B, r) singular values, descending; r = min(m, n), or k for ``compute="topk"``.
    U:  (B, m, r) left singular vectors (orthonormal columns), or None for ``"values"``.
    Vh: (B, r, n) right singular vectors (orthonormal rows), or None for ``"values"``.
    """

    S: Array
    U: Array | None = None
    Vh: Array | None = None


@dataclass(frozen=True)
class _Plan:
    """What to compute on each chunk: ``k`` triplets by ``method`` on ``device``."""

    compute: str
    k: int
    method: str
    exact_dense: str  # the exact method randomized falls back to
    device: torch.device
    tol: float
    seed: int


def batched_svd(
    a: Any,
    *,
    compute: str = "values",
    k: int | None = None,
    method: str = "auto",
    device: str | torch.device = "cpu",
    max_bytes: int = 256 * 2**20,
    seed: int = 0,
    tol: float | None = None,
    threads: int | None = 1,
) -> SVD:
    """SVD of every matrix in a stack.

    Args:
        a: (B, m, n) numpy array or torch tensor, any float dtype; or an array-like whose
            slices are numpy arrays (a zarr array), read one chunk at a time. A single matrix
            must be passed as ``a[None]``: only 3-D input is accepted, and results always
            keep the B axis.
        compute: ``"values"`` (S only), ``"topk"`` (top-k S, U, Vh) or ``"full"`` (the reduced
            SVD: U (B, m, r), Vh (B, r, n), r = min(m, n)).
        k: number of triplets for ``"topk"``, 1 ≤ k ≤ min(m, n); must be None otherwise.
        method: ``"auto"`` (module docstring), ``"gesdd"``, ``"gesvd"``, ``"gram"`` or
            ``"randomized"`` (top-k only).
        device: where to compute: ``"cpu"`` (default) or ``"cuda"``; results return to the
            input's device.
        max_bytes: bound on the float64 working set of one chunk, bytes (results excluded).
        seed: seed of the randomized method's Gaussian sketch.
        tol: randomized residual tolerance relative to σ_1 (default in the module docstring).
        threads: BLAS threads (numpy/scipy OpenBLAS) during the call, restored afterwards;
            None leaves the process setting alone. 1 is the measured best on a shared
            machine (module docstring).

    Returns:
        :class:`SVD` of float64 arrays: S (B, r) descending, U (B, m, r), Vh (B, r, n).
    """
    a = as_stack(a)
    batch, m, n = check_stack(a)
    plan = _make_plan(a, compute, k, method, device, tol, seed)
    _check_limits(max_bytes, threads)
    wide = m < n
    out = _allocate(a, batch, m, n, plan)
    step = max(1, max_bytes // (8 * _work_elements(max(m, n), min(m, n), plan)))
    nonfinite = failed = 0
    with blas_threads(threads):
        for start in range(0, batch, step):
            x = load_tall(a[start : start + step], plan.device, wide)
            finite = finite_matrices(x)
            x[~finite] = 0.0
            s, u, v = _solve(x, plan)
            _store(out, slice(start, start + step), s, u, v, finite, wide)
            nonfinite += int((~finite).sum())
            failed += int((finite & ~_finite_result(s, u, v)).sum())
    _warn(nonfinite, failed, batch)
    return SVD(*out)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """threadpoolctl's view of the BLAS libraries numpy and scipy loaded (built once: a
    fresh scan costs ~1 ms, more than a small SVD)."""
    return ThreadpoolController()


def blas_threads(threads: int | None):
    """Context manager limiting BLAS to ``threads`` threads (no-op for None)."""
    return _blas_controller().limit(limits=threads, user_api="blas")


def as_stack(a: Any) -> Any:
    """numpy arrays and torch tensors as they are; array-likes that slice into numpy arrays
    (a zarr array, a memmap) as they are too, so that only one chunk is read at a time;
    anything else through ``np.asarray``."""
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return a
    if all(hasattr(a, name) for name in ("shape", "dtype", "ndim", "__getitem__")):
        return a
    return np.asarray(a)


def check_stack(a: Any) -> tuple[int, int, int]:
    """Validate the stack's rank, dtype and sizes; return (B, m, n)."""
    if a.ndim != 3:
        raise ValueError(
            f"a must be a (B, m, n) stack of matrices, got shape {tuple(a.shape)}; "
            "pass a single matrix as a[None]"
        )
    if isinstance(a, torch.Tensor):
        floating = a.is_floating_point()
    else:
        floating = np.dtype(a.dtype).kind == "f"
    if not floating:
        raise ValueError(
            f"a has dtype {a.dtype}; accepted: float16, bfloat16, float32, float64"
        )
    batch, m, n = a.shape
    if m == 0 or n == 0:
        raise ValueError(f"matrices must have at least one row and column, got {m}x{n}")
    return batch, m, n


def _check_limits(max_bytes: int, threads: int | None) -> None:
    """Validate the resource arguments."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")


def _make_plan(
    a: Any,
    compute: str,
    k: int | None,
    method: str,
    device: str | torch.device,
    tol: float | None,
    seed: int,
) -> _Plan:
    """Validate the arguments and resolve ``auto`` for this shape, dtype and device."""
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _, m, n = a.shape
    short, long_ = min(m, n), max(m, n)
    if compute == "topk":
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= short:
            raise ValueError(f"k must be an int in [1, min(m, n)] = [1, {short}], got {k!r}")
    elif k is not None:
        raise ValueError(f"k is only used with compute='topk'; got k={k!r} with {compute!r}")
    if method == "randomized" and compute != "topk":
        raise ValueError("method='randomized' computes only compute='topk'")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    eps = storage_eps(a.dtype)
    exact_dense = "gram" if eps >= _EPS32 else "gesdd"
    r = int(k) if compute == "topk" else short
    if method == "auto":
        method = _auto_method(compute, r, short, exact_dense)
    if tol is None:
        tol = math.sqrt(long_) * (_EPS32 if exact_dense == "gram" else 32 * _EPS64)
    return _Plan(compute, r, method, exact_dense, compute_device(device), tol, int(seed))


def _auto_method(compute: str, k: int, short: int, exact_dense: str) -> str:
    """The measured fastest exact method (module docstring)."""
    if exact_dense == "gesdd":
        return "gesdd"
    if compute == "topk" and short >= _RANDOMIZED_MIN_SHORT_SIDE:
        if sketch_width(k, short) <= _RANDOMIZED_MAX_SKETCH_FRACTION * short:
            return "randomized"
    return "gram"


def compute_device(device: str | torch.device) -> torch.device:
    """Resolve and check the compute device: "cpu", "cuda" or "cuda:N" (or a torch.device)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    device = resolved
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    return device


def _work_elements(m: int, n: int, plan: _Plan) -> int:
    """Float64 elements one (m ≥ n) matrix needs while it is processed (a safe estimate)."""
    copies = 2 * m * n  # the tall float64 copy and LAPACK's own copy
    if plan.method == "randomized":
        return copies + 6 * (m + n) * sketch_width(plan.k, n)
    if plan.method == "gram":
        vectors = 0 if plan.compute == "values" else 3 * m * plan.k + n * n
        return copies + 2 * n * n + vectors
    return copies + (n * n if plan.compute == "values" else 2 * m * n + 5 * n * n)


def _allocate(a: Array, batch: int, m: int, n: int, plan: _Plan) -> list[Array | None]:
    """Empty float64 result arrays S, U, Vh of the input's kind and device."""
    shapes = [(batch, plan.k)]
    if plan.compute != "values":
        shapes += [(batch, m, plan.k), (batch, plan.k, n)]
    if isinstance(a, torch.Tensor):
        arrays = [torch.empty(s, dtype=torch.float64, device=a.device) for s in shapes]
    else:
        arrays = [np.empty(s) for s in shapes]
    return arrays + [None] * (3 - len(arrays))


def load_tall(chunk: Array, device: torch.device, wide: bool) -> Array:
    """A private float64 copy of the chunk (numpy or torch), made tall, on the compute
    device: a numpy array on the CPU, a torch tensor on CUDA."""
    if isinstance(chunk, torch.Tensor):
        x = chunk.detach().to(device=device, dtype=torch.float64, copy=True)
        x = (x.mT if wide else x).contiguous()
        return x.numpy() if device.type == "cpu" else x
    x = np.array(chunk.swapaxes(1, 2) if wide else chunk, dtype=np.float64, order="C")
    return x if device.type == "cpu" else torch.from_numpy(x).to(device)


def _store(
    out: list[Array | None],
    rows: slice,
    s: Array,
    u: Array | None,
    v: Array | None,
    finite: Array,
    wide: bool,
) -> None:
    """Write one chunk's results into the outputs (transposing back wide matrices); NaN for
    matrices that held NaN/Inf."""
    left, right = (v, u) if wide else (u, v)
    results = [s] if u is None else [s, left, right.swapaxes(-1, -2)]
    for target, value in zip(out, results):
        value = like(value, target)
        value[~like(finite, target)] = np.nan
        target[rows] = value


def like(x: Array, ref: Array) -> Array:
    """``x`` as the array kind (and device) of ``ref``."""
    if isinstance(ref, torch.Tensor):
        x = np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x
        return torch.as_tensor(x, device=ref.device)
    return _numpy(x)


def finite_matrices(x: Array) -> Array:
    """(b,) bool: which matrices of a (b, ...) stack hold only finite numbers."""
    if isinstance(x, torch.Tensor):
        return torch.isfinite(x).flatten(1).all(1)
    return np.isfinite(x).reshape(len(x), -1).all(1)


def _finite_result(s: Array, u: Array | None, v: Array | None) -> Array:
    """(b,) bool: which rows of a result are finite in S, U and V."""
    finite = finite_matrices(s)
    if u is not None:
        finite = finite & finite_matrices(u) & finite_matrices(v)
    return finite


def _numpy(x: Array) -> np.ndarray:
    """``x`` as a numpy array (copied to the CPU if it is a tensor)."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


def _warn(nonfinite: int, failed: int, batch: int) -> None:
    """One RuntimeWarning per kind of trouble in the whole call."""
    if nonfinite:
        warnings.warn(
            f"{nonfinite} of {batch} matrices hold NaN or Inf; their results are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    if failed:
        warnings.warn(
            f"the SVD of {failed} of {batch} matrices failed with every method; "
            "their results are NaN",
            RuntimeWarning,
            stacklevel=3,
        )


def _solve(x: Array, plan: _Plan) -> Triplets:
    """Run the plan on a chunk of tall float64 matrices → S (b, k), U (b, m, k), V (b, n, k).

    Matrices it fails on (LinAlgError, or a non-finite result) are retried one by one down
    the fallback chain; those no method can do stay NaN.
    """
    try:
        s, u, v = _run(plan.method, x, plan)
    except LINALG_ERRORS:
        s, u, v = _nan_result(x, plan)
    for i in np.flatnonzero(_numpy(~_finite_result(s, u, v))):
        one = _retry(x[i : i + 1], plan)
        if one is not None:
            s[i] = one[0][0]
            if u is not None:
                u[i], v[i] = one[1][0], one[2][0]
    return s, u, v


def _retry(x: Array, plan: _Plan) -> Triplets | None:
    """First finite result of the fallback chain for one matrix (1, m, n), or None."""
    chain = [(plan.method, plan.device)]
    chain += [(m, plan.device) for m in ("gesdd", "gesvd") if m != plan.method]
    if plan.device.type == "cuda":
        cpu = torch.device("cpu")
        chain += [("gesdd", cpu), ("gesvd", cpu)]
    for method, device in chain:
        xd = load_tall(x, device, wide=False)
        try:
            s, u, v = _run(method, xd, plan)
        except LINALG_ERRORS:
            continue
        if bool(_finite_result(s, u, v).all()):
            return tuple(None if r is None else like(r, x) for r in (s, u, v))
    return None


def _nan_result(x: Array, plan: _Plan) -> Triplets:
    """NaN-filled S, U, V for a chunk (filled in by the retries)."""
    b, m, n = x.shape
    shapes = [(b, plan.k)] + ([] if plan.compute == "values" else [(b, m, plan.k), (b, n, plan.k)])
    arrays = [full(x, shape, np.nan) for shape in shapes]
    return tuple(arrays + [None] * (3 - len(arrays)))


def _run(method: str, x: Array, plan: _Plan) -> Triplets:
    """One method on a stack of tall matrices → S (b, k), U (b, m, k), V (b, n, k)."""
    if method != "randomized":
        return _KERNELS[method](x, plan.compute, plan.k)
    s, u, v, converged = methods.randomized(x, plan.k, plan.tol, plan.seed)
    if not bool(converged.all()):
        rest = ~converged
        s[rest], u[rest], v[rest] = _solve(x[rest], replace(plan, method=plan.exact_dense))
    return s, u, v


_KERNELS = {"gesdd": methods.gesdd, "gesvd": methods.gesvd, "gram": methods.gram}
