"""SVDs of a series of snapshots of one matrix, with the OIALR basis stability between neighbours.

:func:`series_svd` takes a (B, m, n) stack of consecutive snapshots of one matrix and returns,
for each, all r = min(m, n) singular values, its top-k singular triplets and its OIALR
full-basis stability ⟨Q_prev, Q⟩_F / r against the snapshot before it (docs/architecture.md
§3), where Q = U·Vh is the orthogonal polar factor. The snapshot before ``a[0]`` is given by
``previous``, the :class:`Polar` the last call returned, so a long series is processed chunk by
chunk without decomposing any snapshot twice.

How Q is computed (float64 throughout):

- float32-or-lower storage: from the eigenpairs (λ_i, v_i) of the float64 Gram matrix G = AᵀA
  of the short side, which also give the singular values (σ_i = √λ_i, exact at the storage
  precision: spectra.core.linalg) and the top-k vectors: Q = A·G^(-1/2) = A·V·Σ⁻¹·Vᵀ, one more
  product per snapshot instead of a full SVD, and the stability is one dot product per pair.
  Its rounding error grows with how ill-conditioned A is: measured against LAPACK on matrices
  of known spectra it stays below ``ERROR_FACTOR``·eps64·mean_i (σ_1/σ_i)² (docs/benchmarks.md).
  A snapshot whose estimate exceeds ``STABILITY_TOL`` (ill-conditioned or singular) takes the
  exact path below; so does one whose ``eigh`` fails.
- float64 storage, and the snapshots above: LAPACK gesdd's full reduced SVD, Q = U·Vh (the
  Gram matrix cannot see singular values below ~1e-8·σ_1 of a float64 matrix).

The top-k left vectors of the Gram path are A·V_k/σ_k made orthonormal as in
``spectra.core.svd_methods.gram``. A snapshot holding NaN/Inf gets NaN rows (one RuntimeWarning
per call); a zero snapshot gets zero values, NaN vectors and NaN stabilities (it has no basis).
Wide matrices are handled through their transpose; the stability does not depend on it.
``device="cuda"`` runs the same steps with torch on the GPU, a chunk of snapshots at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spectra.core import svd_methods as methods
from spectra.core.linalg import (Array, as_stack, batched_svd, blas_threads, check_stack,
                                 compute_device, finite_matrices, like, load_tall)
from spectra.core.metrics import storage_eps

STABILITY_TOL = 1e-9  # largest estimated rounding error of a Gram-path stability
ERROR_FACTOR = 5.0  # measured error ≤ 5.2·eps64·mean (σ_1/σ_i)² (docs/benchmarks.md)
_EPS64 = float(np.finfo(np.float64).eps)
_EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Polar:
    """The orthogonal polar factor of one snapshot, float64, tall orientation (max(m, n),
    min(m, n)), on the compute device: what the next chunk's first stability needs."""

    q: Array


@dataclass(frozen=True)
class SeriesSVD:
    """Result of :func:`series_svd`, float64, of the input's kind (numpy or torch).

    S:  (B, r) all singular values, descending, r = min(m, n).
    U:  (B, m, k) top-k left singular vectors (None for k = 0).
    Vh: (B, k, n) top-k right singular vectors (None for k = 0).
    stability: (B,) OIALR full-basis stability against the previous snapshot; NaN where there
        is none or either snapshot has no basis (zero, NaN/Inf). None for k = 0.
    last: the polar factor of the last snapshot, for the next call (None for k = 0, or when the
        last snapshot has no basis).
    """

    S: Array
    U: Array | None = None
    Vh: Array | None = None
    stability: Array | None = None
    last: Polar | None = None


def series_svd(a: Any, k: int, previous: Polar | None = None, *, device: str = "cpu",
               max_bytes: int = 256 * 2**20, threads: int | None = 1) -> SeriesSVD:
    """Values, top-k triplets and neighbour stabilities of consecutive snapshots of a matrix.

    Args:
        a: (B, m, n) stack of snapshots in order (numpy array, torch tensor or a lazy array
            read one chunk at a time), any float dtype: the storage precision.
        k: number of top triplets, 0 ≤ k ≤ min(m, n); 0 computes only the singular values
            (spectra.core.linalg's fastest exact method) and no stability.
        previous: the ``last`` of the call on the snapshots just before ``a[0]`` (its
            stability is NaN without one).
        device: "cpu" or "cuda" (results return to the input's kind and device).
        max_bytes: bound on the float64 working set of one chunk, bytes.
        threads: BLAS threads during the call (None leaves the setting alone).

    Returns:
        :class:`SeriesSVD`.
    """
    a = as_stack(a)
    batch, m, n = check_stack(a)
    short = min(m, n)
    if not isinstance(k, (int, np.integer)) or not 0 <= k <= short:
        raise ValueError(f"k must be an int in [0, min(m, n)] = [0, {short}], got {k!r}")
    if k == 0:
        return SeriesSVD(batched_svd(a, compute="values", device=device, max_bytes=max_bytes,
                                     threads=threads).S)
    target = compute_device(device)
    exact_only = storage_eps(a.dtype) < _EPS32
    wide = m < n
    step = max(1, max_bytes // (8 * _work_elements(max(m, n), short, k)))
    parts, nonfinite = [], 0
    with blas_threads(threads):
        for start in range(0, batch, step):
            x = load_tall(a[start:start + step], target, wide)
            part, previous, bad = _chunk(x, int(k), previous, exact_only)
            parts.append(part)
            nonfinite += bad
    if nonfinite:
        warnings.warn(f"{nonfinite} of {batch} matrices hold NaN or Inf; their results are NaN",
                      RuntimeWarning, stacklevel=2)
    return _assemble(a, parts, wide, previous, batch, m, n, int(k))


def _work_elements(m: int, n: int, k: int) -> int:
    """Float64 elements one tall (m ≥ n) snapshot needs while processed: its copy, its polar
    factor and the product that makes it, the n × n Gram, eigenvectors and G^(-1/2), eigh's
    work space and the top-k vectors (the exact path's gesdd stays within the same)."""
    return 3 * m * n + 6 * n * n + 2 * m * k


def _chunk(x: Array, k: int, previous: Polar | None,
           exact_only: bool) -> tuple[tuple[Array, ...], Polar | None, int]:
    """One chunk of tall float64 snapshots (b, m, n) → ((S, U, V, stability), last, #non-finite)."""
    b, m, n = x.shape
    finite = finite_matrices(x)
    x[~finite] = 0.0
    s = methods.full(x, (b, n), np.nan)
    u, v = methods.full(x, (b, m, k), np.nan), methods.full(x, (b, n, k), np.nan)
    q = _empty(x, (b, m, n))  # rows read only where usable
    exact = _copy(finite)
    if not exact_only:
        exact = finite & ~_gram_path(x, k, finite, s, u, v, q)
    if bool(exact.any()):
        _exact_path(x, k, exact, s, u, v, q)
    usable = finite & (s[:, 0] > 0)
    stability = _stabilities(q, usable, previous)
    last = Polar(_copy(q[-1])) if bool(usable[-1]) else None
    s[~finite] = np.nan
    return (s, u, v, stability), last, int((~finite).sum())


def _gram_path(x: Array, k: int, finite: Array, s: Array, u: Array, v: Array,
               q: Array) -> Array:
    """Fill rows whose Gram-derived polar factor is accurate (estimate ≤ STABILITY_TOL);
    return that mask (b,). Zero matrices count as done: values 0, no basis."""
    numpy = isinstance(x, np.ndarray)
    linalg = np.linalg if numpy else torch.linalg
    try:
        w, vectors = linalg.eigh(x.swapaxes(-1, -2) @ x)
    except methods.LINALG_ERRORS:
        return finite & False
    sv = methods.sqrt_descending(w)
    vectors = methods.flip(vectors)
    top = sv[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = ((top / sv) ** 2).mean(-1)  # mean (σ_1/σ_i)²: inf when singular
    zero = top[:, 0] == 0
    accurate = finite & ~zero & (ERROR_FACTOR * _EPS64 * spread <= STABILITY_TOL)
    every = bool(accurate.all())
    rows = slice(None) if every else _indices(accurate)  # no copies in the common case
    if every or len(rows):
        xa, va, sa = x[rows], vectors[rows], sv[rows]
        half = va / sa[:, None, :] ** 0.5  # G^(-1/2) = half·halfᵀ
        q[rows] = xa @ (half @ half.swapaxes(-1, -2))
        s[rows] = sa
        v[rows] = va[:, :, :k]
        u[rows] = methods.left_vectors(xa, va[:, :, :k], sa[:, :k])
    zeros = _indices(finite & zero)
    if len(zeros):
        s[zeros] = 0.0
    return accurate | (finite & zero)


def _exact_path(x: Array, k: int, rows_mask: Array, s: Array, u: Array, v: Array,
                q: Array) -> None:
    """Fill ``rows_mask`` rows from LAPACK gesdd's full SVD (spectra.core.linalg's fallback
    chain included); zero matrices get values 0 and no basis."""
    rows = _indices(rows_mask)
    svd = batched_svd(x[rows], compute="full", method="gesdd", device=_device_of(x),
                      threads=None)
    nonzero = svd.S[:, 0] > 0
    s[rows] = svd.S
    basis = rows[_indices(nonzero)]
    svd_u, svd_vh = svd.U[nonzero], svd.Vh[nonzero]
    q[basis] = svd_u @ svd_vh
    u[basis] = svd_u[:, :, :k]
    v[basis] = svd_vh[:, :k].swapaxes(-1, -2)


def _stabilities(q: Array, usable: Array, previous: Polar | None) -> Array:
    """(b,) ⟨Q_{i-1}, Q_i⟩_F / n for consecutive rows (row 0 against ``previous``)."""
    b, _, n = q.shape
    out = methods.full(q, (b,), np.nan)
    if b > 1:
        pairs = _indices(usable[1:] & usable[:-1])
        out[pairs + 1] = (q[pairs] * q[pairs + 1]).sum((-2, -1)) / n
    if previous is not None and b and bool(usable[0]):
        out[0] = (like(previous.q, q) * q[0]).sum() / n
    return out


def _empty(like: Array, shape: tuple[int, ...]) -> Array:
    if isinstance(like, torch.Tensor):
        return torch.empty(shape, dtype=torch.float64, device=like.device)
    return np.empty(shape)


def _copy(x: Array) -> Array:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def _indices(mask: Array) -> Array:
    """Positions of the true entries of a (b,) mask, of its kind and device."""
    if isinstance(mask, torch.Tensor):
        return torch.nonzero(mask).flatten()
    return np.flatnonzero(mask)


def _device_of(x: Array) -> str | torch.device:
    return x.device if isinstance(x, torch.Tensor) else "cpu"


def _assemble(a: Any, parts: list[tuple[Array, ...]], wide: bool, last: Polar | None,
              batch: int, m: int, n: int, k: int) -> SeriesSVD:
    """Concatenate the chunks, turn wide results back, return them as the input's kind."""
    if not parts:
        r = min(m, n)
        empty = np.empty
        return SeriesSVD(like(empty((0, r)), a), like(empty((0, m, k)), a),
                         like(empty((0, k, n)), a), like(empty((0,)), a), last)
    cat = np.concatenate if isinstance(parts[0][0], np.ndarray) else torch.cat
    s, u, v, stability = (cat([p[i] for p in parts]) for i in range(4))
    left, right = (v, u) if wide else (u, v)
    return SeriesSVD(like(s, a), like(left, a), like(right.swapaxes(-1, -2), a),
                     like(stability, a), last)
