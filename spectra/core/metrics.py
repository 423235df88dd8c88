"""Spectral metrics: pure functions of singular values and of orthonormal bases.

Arrays in, numbers out: no I/O, no globals. Every function works on a batch. Singular values
come as an array ``s`` of shape ``(..., r)``, sorted descending along the last axis (r is
usually min(m, n) of the matrix they came from); results have shape ``(...)`` (a numpy scalar
when ``s`` is 1-D). Inputs may be numpy arrays, anything ``np.asarray`` accepts, or torch
tensors on any device (copied to the CPU). Everything is computed in float64 and returned as
numpy float64, including the ranks, so that a row of NaN singular values (a matrix whose SVD
failed or that held NaN/Inf) gives NaN instead of a made-up integer.

Conventions (docs/architecture.md §3), chosen once and tested:

- Exact zeros contribute nothing: they add no probability mass to the effective rank and no
  energy to the stable / explained-variance ranks. A zero matrix has effective rank, stable
  rank, numerical rank and explained-variance rank 0.
- The InRank explained ratio is the exception: it follows the official InRank code, which takes
  the variance over the full vector of min(m, n) singular values, zeros included.
- ``condition_number`` is σ_1 / σ_r over all r values: ``inf`` for any singular matrix,
  including the zero matrix (dropping zeros would report a finite number for a singular one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts


def storage_eps(dtype: Any) -> float:
    """Machine epsilon of a floating dtype: numpy (``np.float32``, ``"float16"``), torch
    (``torch.bfloat16``) or a torch dtype's name (``"bfloat16"``). float64 2.2e-16, float32
    1.2e-7, float16 9.8e-4, bfloat16 7.8e-3."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # names numpy lacks: "bfloat16"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating dtype")
        return float(torch.finfo(dtype).eps)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind != "f":
        raise ValueError(f"dtype {np_dtype} is not a floating dtype")
    return float(np.finfo(np_dtype).eps)


def _as_float64(x: ArrayLike) -> np.ndarray:
    """numpy float64 copy/view of ``x``; torch tensors (any device, any dtype) are detached."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _singular_values(s: ArrayLike, *, sorted_: bool = False) -> np.ndarray:
    """Validate ``s`` (..., r): at least 1-D, no negative values, and (if ``sorted_``)
    descending along the last axis (rows holding NaN are not checked; they give NaN)."""
    s = _as_float64(s)
    if s.ndim == 0:
        raise ValueError("s must have shape (..., r), got a scalar")
    if np.any(s < 0):
        raise ValueError("s holds negative values; singular values are >= 0")
    if sorted_:
        steps = np.diff(s, axis=-1)
        if np.any(steps > 0):
            raise ValueError("s must be sorted descending along its last axis")
    return s


def _finish(values: np.ndarray, s: np.ndarray) -> np.ndarray | np.float64:
    """Set rows of ``s`` that contain NaN to NaN; return a numpy scalar for 0-d results."""
    values = np.where(np.isnan(s).any(axis=-1), np.nan, values)
    return values[()]


def effective_rank(s: ArrayLike) -> np.ndarray | np.float64:
    """Effective rank (Roy & Vetterli 2007): exp(−Σ p_i ln p_i), p_i = σ_i / Σ_j σ_j.

    ``s`` (..., r) singular values, any order. Returns (...) float64 in [1, r] for a nonzero
    matrix (r for the identity, exp(entropy) in general); 0 for a zero matrix.
    """
    s = _singular_values(s)
    total = s.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = s / total[..., None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    erank = np.where(total > 0, np.exp(-plogp.sum(axis=-1)), 0.0)
    return _finish(erank, s)


def stable_rank(s: ArrayLike) -> np.ndarray | np.float64:
    """Stable rank Σ σ_i² / σ_1² = ‖A‖_F² / ‖A‖_2². ``s`` (..., r), any order.

    Returns (...) float64 in [1, r] for a nonzero matrix; 0 for a zero matrix.
    """
    s = _singular_values(s)
    top = s.max(axis=-1, initial=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(top > 0, ((s / top[..., None]) ** 2).sum(axis=-1), 0.0)
    return _finish(ratio, s)


def numerical_rank(
    s: ArrayLike,
    *,
    shape: tuple[int, int],
    dtype: Any = np.float32,
    rtol: float | None = None,
    atol: float = 0.0,
) -> np.ndarray | np.float64:
    """Numerical rank #{σ_i > max(atol, rtol·σ_1)}.

    ``s`` (..., r) singular values of matrices of ``shape`` (m, n) stored in ``dtype`` (numpy
    or torch dtype: the precision the matrix was *stored* in, not the precision of the SVD).
    ``rtol`` defaults to max(m, n)·eps(dtype): singular values below it are indistinguishable
    from the rounding of the stored entries. ``atol`` is in the units of ``s``.
    Returns (...) float64 counts; 0 for a zero matrix.
    """
    s = _singular_values(s)
    if len(shape) != 2:
        raise ValueError(f"shape must be the matrix shape (m, n), got {tuple(shape)}")
    m, n = shape
    if rtol is None:
        rtol = max(m, n) * storage_eps(dtype)
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    top = s.max(axis=-1, initial=0.0)
    threshold = np.maximum(atol, rtol * top)
    count = (s > threshold[..., None]).sum(axis=-1).astype(np.float64)
    return _finish(count, s)


def explained_variance_rank(s: ArrayLike, tau: float = 0.9) -> np.ndarray | np.float64:
    """Smallest k with Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ tau (the rank that keeps a fraction tau of
    the energy ‖A‖_F²).

    ``s`` (..., r) sorted descending; ``tau`` in (0, 1]. Returns (...) float64 in [1, r];
    0 for a zero matrix.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    s = _singular_values(s, sorted_=True)
    energy = np.cumsum(s**2, axis=-1)
    total = energy[..., -1:]
    k = (energy < tau * total).sum(axis=-1) + 1.0
    k = np.where(total[..., 0] > 0, k, 0.0)
    return _finish(k, s)


def inrank_explained_ratio(s: ArrayLike) -> np.ndarray:
    """InRank's explained ratio g(j) for j = 1..r, returned as ``g[..., j - 1]``.

    g(j) = 1 − Var(σ ⊙ 1[i ≥ j]) / Var(σ), with 0-based i over the full vector of r = min(m, n)
    singular values (zeros included): the top j values are zeroed and the variance of what is
    left is compared with the variance of all of them. This is what the official code computes
    (``in_rank_efficient.py``: ``s_current[j:] = 0; 1 - var(s - s_current) / var(s)``), where
    j is the number of singular values kept, i.e. the candidate rank. g(0) = 0 is not
    returned; g(r) = 1. g is not monotone: for a flat-topped spectrum it first goes *negative*
    (removing one of many equal values raises the variance of the rest).

    ``s`` (..., r) sorted descending. Returns (..., r) float64. Rows where Var(σ) = 0 (all
    values equal: the identity, a zero matrix) have no defined ratio and give NaN.
    """
    s = _singular_values(s, sorted_=True)
    r = s.shape[-1]
    mean = s.mean(axis=-1, keepdims=True)
    dev = s - mean
    # Var of the tail vector t_j, centred on the full mean μ so the sums do not cancel:
    # r·Var(t_j) = j·μ² + Σ_{i≥j} d_i² − r·δ_j²,  δ_j = (Σ_{i≥j} d_i − j·μ) / r,  d = σ − μ.
    tail_dev = np.cumsum(dev[..., ::-1], axis=-1)[..., ::-1]
    tail_dev2 = np.cumsum((dev**2)[..., ::-1], axis=-1)[..., ::-1]
    j = np.arange(1, r + 1, dtype=np.float64)
    tail_dev = np.concatenate([tail_dev[..., 1:], np.zeros_like(mean)], axis=-1)
    tail_dev2 = np.concatenate([tail_dev2[..., 1:], np.zeros_like(mean)], axis=-1)
    shift = (tail_dev - j * mean) / r
    tail_var = (j * mean**2 + tail_dev2) / r - shift**2
    total_var = (dev**2).mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(total_var > 0, 1.0 - tail_var / total_var, np.nan)
    g[..., -1] = np.where(total_var[..., 0] > 0, 1.0, np.nan)
    return np.where(np.isnan(s).any(axis=-1, keepdims=True), np.nan, g)


def inrank_rank(s: ArrayLike, alpha: float = 0.9) -> np.ndarray | np.float64:
    """InRank's rank rule: the first j in 1..r with g(j) > alpha (``inrank_explained_ratio``),
    i.e. the number of leading singular values to keep. Always exists for alpha < 1 since
    g(r) = 1.

    ``s`` (..., r) sorted descending, the full vector of min(m, n) singular values; ``alpha``
    in [0, 1). Returns (...) float64 in [1, r]. Flat spectra (Var(σ) = 0) have no ratio: a
    nonzero flat spectrum (e.g. the identity) gets r — every direction matters equally — and a
    zero matrix 0. The official code searches only a window [r_now, min(r_now + b, M − b) − 1]
    and returns the window's last j when none passes; apply that window to
    ``inrank_explained_ratio`` directly when reproducing it.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    s = _singular_values(s, sorted_=True)
    g = inrank_explained_ratio(s)
    first = np.argmax(g > alpha, axis=-1) + 1.0
    flat = np.isnan(g[..., -1])
    flat_rank = np.where(s[..., 0] > 0, float(s.shape[-1]), 0.0)
    return _finish(np.where(flat, flat_rank, first), s)


def singular_value(s: ArrayLike, i: int) -> np.ndarray | np.float64:
    """σ_i, the i-th largest singular value (i = 1 for the largest). ``s`` (..., r) sorted
    descending, 1 ≤ i ≤ r. Returns (...) float64."""
    s = _singular_values(s, sorted_=True)
    if not isinstance(i, (int, np.integer)) or not 1 <= i <= s.shape[-1]:
        raise ValueError(f"i={i!r}; must be an int in [1, {s.shape[-1]}]")
    return s[..., i - 1][()]


def frobenius_norm(s: ArrayLike) -> np.ndarray | np.float64:
    """‖A‖_F = sqrt(Σ σ_i²), scaled by σ_1 so it neither overflows nor underflows. (...)."""
    s = _singular_values(s)
    top = s.max(axis=-1, initial=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(top > 0, top * np.sqrt(((s / top[..., None]) ** 2).sum(axis=-1)), 0.0)
    return _finish(norm, s)


def spectral_norm(s: ArrayLike) -> np.ndarray | np.float64:
    """‖A‖_2 = σ_1 (the largest value; ``s`` need not be sorted). (...)."""
    s = _singular_values(s)
    return _finish(s.max(axis=-1, initial=0.0), s)


def nuclear_norm(s: ArrayLike) -> np.ndarray | np.float64:
    """‖A‖_* = Σ σ_i. (...)."""
    s = _singular_values(s)
    return _finish(s.sum(axis=-1), s)


def condition_number(s: ArrayLike) -> np.ndarray | np.float64:
    """κ_2 = σ_1 / σ_r over all r = min(m, n) values; ``inf`` for a singular matrix, the zero
    matrix included. ``s`` (..., r) must hold all r values (not a top-k). (...)."""
    s = _singular_values(s)
    top = s.max(axis=-1)
    bottom = s.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(bottom > 0, top / bottom, np.inf)
    return _finish(kappa, s)


def _matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """aᵀb over the last two axes, broadcasting the leading ones."""
    return np.swapaxes(a, -1, -2) @ b


def _bases(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate two stacks of bases (..., d, k1), (..., d, k2); put the wider one first."""
    a, b = _as_float64(a), _as_float64(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-2] != b.shape[-2]:
        raise ValueError(
            f"bases must have shape (..., d, k) with the same d, got {a.shape} and {b.shape}"
        )
    return (a, b) if a.shape[-1] >= b.shape[-1] else (b, a)


def principal_angles(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Principal angles between span(a) and span(b), in radians, ascending.

    ``a`` (..., d, k1), ``b`` (..., d, k2) with orthonormal columns (leading axes broadcast).
    Returns (..., min(k1, k2)) float64 in [0, π/2].

    cos θ_i are the singular values of aᵀb, but arccos loses small angles (cos θ = 1 − θ²/2
    rounds to 1 below θ ≈ 1e-8); sin θ_i are the singular values of b − a(aᵀb) (with k2 ≤ k1),
    whose arcsin is accurate to ~1e-16 rad absolute for small θ. Each angle is taken from the
    sine form where it is below π/4 and from the cosine form above (where arcsin loses
    accuracy), all in float64. Bases holding NaN or Inf give NaN angles.
    """
    a, b = _bases(a, b)
    broken = ~(np.isfinite(a).all(axis=(-2, -1)) & np.isfinite(b).all(axis=(-2, -1)))
    a, b = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    overlap = _matmul_t(a, b)
    cosines = np.linalg.svd(overlap, compute_uv=False)
    sines = np.linalg.svd(b - a @ overlap, compute_uv=False)[..., ::-1]
    from_cos = np.arccos(np.clip(cosines, -1.0, 1.0))
    from_sin = np.arcsin(np.clip(sines, -1.0, 1.0))
    angles = np.where(from_sin < np.pi / 4, from_sin, from_cos)
    return np.where(broken[..., None], np.nan, angles)


def largest_principal_angle(a: ArrayLike, b: ArrayLike) -> np.ndarray | np.float64:
    """The largest principal angle between span(a) and span(b), radians. (...)."""
    return principal_angles(a, b)[..., -1][()]


def subspace_similarity(a: ArrayLike, b: ArrayLike) -> np.ndarray | np.float64:
    """‖aᵀb‖_F² / min(k1, k2) = mean cos² of the principal angles: 1 when one span contains
    the other, 0 when orthogonal, ≈ max(k1, k2)/d for random subspaces (k/d when k1 = k2).

    ``a`` (..., d, k1), ``b`` (..., d, k2) orthonormal columns. Returns (...) float64.
    """
    a, b = _bases(a, b)
    overlap = _matmul_t(a, b)
    return ((overlap**2).sum(axis=(-2, -1)) / b.shape[-1])[()]


def polar_factor(u: ArrayLike, vh: ArrayLike) -> np.ndarray:
    """Q = U·Vh, the orthogonal polar factor of A = U·diag(σ)·Vh.

    ``u`` (..., m, r), ``vh`` (..., r, n) from a reduced SVD. Returns (..., m, n) float64. For a
    full-rank A, Q is unique: it does not depend on the signs or the rotation inside repeated
    singular values that the SVD happened to choose.
    """
    return _as_float64(u) @ _as_float64(vh)


def oialr_stability(
    u_prev: ArrayLike, vh_prev: ArrayLike, u_now: ArrayLike, vh_now: ArrayLike
) -> np.ndarray | np.float64:
    """OIALR basis stability ⟨Q_prev, Q_now⟩_F / r with Q = U·Vh (1 = unchanged basis).

    ``u_*`` (..., m, r), ``vh_*`` (..., r, n): the r leading singular triplets of the same
    weight at two times. With r = min(m, n) (the full reduced SVD) the columns of the tall Q
    (Qᵀ when m < n) are unit vectors and this is exactly the authors' measure: the mean over
    those min(m, n) columns of the cosine between matching columns of Q_prev and Q_now,
    signed. With r < min(m, n) (top-k triplets) it is the same normalised inner product of the
    rank-r partial isometries U·Vh, in [−1, 1]. Computed as tr((U_prevᵀU_now)(Vh_now Vh_prevᵀ))
    / r without forming Q, so the orientation of the matrix does not matter. Returns (...)
    float64.

    The authors' code (github Helmholtz-AI-Energy/OIALR, ``src/madonna/models/svd/linear.py``,
    ``_full_rank_weight_stability``) transposes the weight when out_features < in_features,
    takes ``u, s, vh = svd(w)``, ``uvh = u @ vh`` and reports
    ``nn.CosineSimilarity(dim=0)(prev_uvh, uvh).mean()``. Differences: their SVD runs in
    float32, ours in float64; their cosine divides by the column norms (1 for a full basis, so
    no difference there); their "previous" is the previous stability check (every
    ``frequency`` steps), ours is whatever pair the caller passes; the top-k form is ours.
    """
    u_prev, vh_prev, u_now, vh_now = map(_as_float64, (u_prev, vh_prev, u_now, vh_now))
    if u_prev.shape[-2:] != u_now.shape[-2:] or vh_prev.shape[-2:] != vh_now.shape[-2:]:
        raise ValueError(
            f"the two SVDs must have the same shapes, got U {u_prev.shape} vs {u_now.shape} "
            f"and Vh {vh_prev.shape} vs {vh_now.shape}"
        )
    left = _matmul_t(u_prev, u_now)  # (..., r, r)
    right = vh_now @ np.swapaxes(vh_prev, -1, -2)  # (..., r, r)
    inner = (left * np.swapaxes(right, -1, -2)).sum(axis=(-2, -1))
    return (inner / u_prev.shape[-1])[()]
