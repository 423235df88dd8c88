"""The SVD methods behind :mod:`spectra.core.linalg` (see its docstring for their accuracy).

Each works on a stack ``x`` (b, m, n) of tall (m ≥ n) float64 matrices — a numpy array on the
CPU, a torch tensor on CUDA — and returns S (b, k) descending, U (b, m, k) and V (b, n, k)
(V, not Vh), with U and V None for ``compute="values"``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

Array = np.ndarray | torch.Tensor
Triplets = tuple[Array, Array | None, Array | None]

LINALG_ERRORS = (np.linalg.LinAlgError, torch.linalg.LinAlgError)
OVERSAMPLE = 10  # randomized sketch width = 2k + OVERSAMPLE
_MAX_POWER_STEPS = 20
_CHOLESKY_QR_MIN_RATIO = 1e-6  # gram vectors: smallest σ_k/σ_1 for the fast U = A·V/σ


def gesdd(x: Array, compute: str, k: int) -> Triplets:
    """LAPACK divide and conquer (numpy's gesdd on the CPU; torch's default driver on CUDA)."""
    numpy = isinstance(x, np.ndarray)
    if compute == "values":
        s = np.linalg.svd(x, compute_uv=False) if numpy else torch.linalg.svdvals(x)
        return s[:, :k], None, None
    u, s, vh = (np.linalg if numpy else torch.linalg).svd(x, full_matrices=False)
    return s[:, :k], u[:, :, :k], vh[:, :k, :].swapaxes(-1, -2)


def gesvd(x: Array, compute: str, k: int) -> Triplets:
    """LAPACK gesvd, the slower, more robust driver (scipy on the CPU; cuSOLVER on CUDA)."""
    vectors = compute != "values"
    if isinstance(x, torch.Tensor):
        if not vectors:
            return torch.linalg.svdvals(x, driver="gesvd")[:, :k], None, None
        u, s, vh = torch.linalg.svd(x, full_matrices=False, driver="gesvd")
        return s[:, :k], u[:, :, :k], vh[:, :k, :].mT
    results = [
        scipy.linalg.svd(
            xi, full_matrices=False, compute_uv=vectors, lapack_driver="gesvd",
            check_finite=False,
        )
        for xi in x
    ]
    if not vectors:
        return np.stack(results)[:, :k], None, None
    u, s, vh = (np.stack(parts) for parts in zip(*results))
    return s[:, :k], u[:, :, :k], vh[:, :k, :].swapaxes(-1, -2)


def gram(x: Array, compute: str, k: int) -> Triplets:
    """Eigen-decomposition of the float64 Gram matrix AᵀA (n × n, the short side)."""
    numpy = isinstance(x, np.ndarray)
    linalg = np.linalg if numpy else torch.linalg
    g = x.swapaxes(-1, -2) @ x
    if compute == "values":
        return sqrt_descending(linalg.eigvalsh(g))[:, :k], None, None
    if compute == "topk" and numpy:
        w, v = _top_eigh(g, k)
    else:
        w, v = linalg.eigh(g)
    s = sqrt_descending(w)[:, :k]
    v = flip(v)[:, :, :k]
    return s, left_vectors(x, v, s), v


def _top_eigh(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs (ascending, like ``eigh``) of each symmetric matrix (LAPACK
    syevr on a subset costs about what the eigenvalues alone do)."""
    n = gram.shape[-1]
    pairs = [
        scipy.linalg.eigh(g, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
        for g in gram
    ]
    w, v = zip(*pairs)
    return np.stack(w), np.stack(v)


def flip(x: Array) -> Array:
    """Reverse the last axis (eigh's ascending order → descending)."""
    return np.flip(x, -1) if isinstance(x, np.ndarray) else torch.flip(x, (-1,))


def sqrt_descending(eigenvalues: Array) -> Array:
    """Singular values from ascending Gram eigenvalues (rounding can make tiny ones < 0)."""
    return flip(eigenvalues).clip(min=0.0) ** 0.5


def left_vectors(x: Array, v: Array, s: Array) -> Array:
    """U (b, m, k) from A·V = U·diag(σ) for Gram-derived V (b, n, k) and σ (b, k).

    Where every σ_i ≥ _CHOLESKY_QR_MIN_RATIO·σ_1, A·V/σ is orthonormal up to
    ~eps64·σ_1²/σ_k² ≤ 2e-4 and one Cholesky-QR pass makes it orthonormal to rounding,
    moving each column by about that much. Otherwise (tiny or zero σ, whose A·v_i carry no
    direction) the Householder QR of A·V completes an orthonormal basis.
    """
    y = x @ v
    if bool((s[:, -1] >= _CHOLESKY_QR_MIN_RATIO * s[:, 0]).all() & (s[:, 0] > 0).all()):
        try:
            return _cholesky_qr(y / s[:, None, :])
        except LINALG_ERRORS:
            pass
    return _aligned_orthonormal(y)


def _cholesky_qr(u: Array) -> Array:
    """Orthonormal factor of a well-conditioned (b, m, k) stack: U·L⁻ᵀ with L·Lᵀ = UᵀU.

    L is within ~1e-4 of the identity here, so multiplying by its explicit inverse is as
    accurate as a triangular solve, and one batched product beats a loop of solves.
    """
    gram = u.swapaxes(-1, -2) @ u
    if isinstance(u, torch.Tensor):
        lower = torch.linalg.cholesky(gram)
        return torch.linalg.solve_triangular(lower, u.mT, upper=False).mT
    inverse = np.linalg.inv(np.linalg.cholesky(gram))
    return u @ inverse.swapaxes(-1, -2)


def _aligned_orthonormal(y: Array) -> Array:
    """Orthonormal Q from the Householder QR of y (b, m, k), column signs matched to y's."""
    numpy = isinstance(y, np.ndarray)
    q, r = (np.linalg if numpy else torch.linalg).qr(y)
    diag = (np if numpy else torch).diagonal(r, 0, -2, -1)
    return q * (np if numpy else torch).where(diag < 0, -1.0, 1.0)[:, None, :]


def randomized(x: Array, k: int, tol: float, seed: int) -> tuple[Array, Array, Array, Array]:
    """Randomized subspace iteration for the top k triplets with an a-posteriori check:
    a matrix is accepted when ‖A v_i − σ_i u_i‖ ≤ tol·σ_1 for every i ≤ k.

    Returns S (b, k), U (b, m, k), V (b, n, k) and ``converged`` (b,) bool; rows that did
    not converge are NaN.
    """
    b, m, n = x.shape
    sketch = _gaussian((n, sketch_width(k, n)), seed, like=x)
    s_out, u_out, v_out = (full(x, shape, np.nan) for shape in ((b, k), (b, m, k), (b, n, k)))
    converged = full(x, (b,), 0.0) > 0  # nothing has converged yet
    active = _arange(b, like=x)
    basis = _aligned_orthonormal(x @ sketch)
    previous = None
    for step in range(_MAX_POWER_STEPS + 1):
        xa = x[active]
        projected = basis.swapaxes(-1, -2) @ xa  # B = QᵀA, (a, width, n)
        ub, s, vbh = (np.linalg if isinstance(x, np.ndarray) else torch.linalg).svd(
            projected, full_matrices=False
        )
        s, u, v = s[:, :k], basis @ ub[:, :, :k], vbh[:, :k, :].swapaxes(-1, -2)
        residual = _worst_column_norm(xa @ v - u * s[:, None, :])
        target = tol * s[:, 0]
        done = residual <= target
        rows = active[done]
        s_out[rows], u_out[rows], v_out[rows], converged[rows] = s[done], u[done], v[done], True
        keep = ~done & ~_hopeless(residual, previous, target, step)
        if not bool(keep.any()):
            break
        active, xa, previous = active[keep], xa[keep], residual[keep]
        basis = _aligned_orthonormal(xa @ projected[keep].swapaxes(-1, -2))  # orth(A·AᵀQ)
    return s_out, u_out, v_out, converged


def _hopeless(residual: Array, previous: Array | None, target: Array, step: int) -> Array:
    """(a,) bool: matrices whose residual will not reach ``target`` within the step budget,
    extrapolating its rate of decrease over the last power step."""
    if step >= _MAX_POWER_STEPS:
        return residual >= 0
    if previous is None:
        return residual < 0
    log = np.log if isinstance(residual, np.ndarray) else torch.log
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = residual / previous
        steps_needed = log(target / residual) / log(rate)
    return (rate >= 1) | (step + steps_needed > _MAX_POWER_STEPS)


def _gaussian(shape: tuple[int, int], seed: int, like: Array) -> Array:
    """Standard normal float64 sketch from ``torch.Generator().manual_seed(seed)`` on
    ``like``'s device (deterministic per device)."""
    device = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    sketch = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    return sketch if isinstance(like, torch.Tensor) else sketch.numpy()


def _arange(b: int, like: Array) -> Array:
    """Indices 0..b-1 of ``like``'s kind and device."""
    if isinstance(like, torch.Tensor):
        return torch.arange(b, device=like.device)
    return np.arange(b)


def _worst_column_norm(y: Array) -> Array:
    """Largest Euclidean column norm of each matrix of a (b, m, k) stack → (b,)."""
    norms = (y * y).sum(-2) ** 0.5
    return (np if isinstance(y, np.ndarray) else torch).amax(norms, -1)


def sketch_width(k: int, short: int) -> int:
    """Columns of the randomized sketch for k triplets."""
    return min(short, 2 * k + OVERSAMPLE)


def full(like: Array, shape: tuple[int, ...], value: float) -> Array:
    """A float64 array of ``value``, of ``like``'s kind and device."""
    if isinstance(like, torch.Tensor):
        return torch.full(shape, value, dtype=torch.float64, device=like.device)
    return np.full(shape, value)
