"""series_svd against scipy on the same matrices: values, top-k bases and the OIALR full-basis
stability, whose Gram-eigenpair path must agree with the SVD definition where it is used and
hand ill-conditioned snapshots to LAPACK."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.core import series
from spectra.core.series import series_svd

EPS64 = np.finfo(np.float64).eps


def with_spectrum(s, m, n, rng, dtype=np.float32):
    u = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return ((u * s) @ v.T).astype(dtype)


def drifting(first, count, rng, scale=1e-2):
    """``count`` snapshots: ``first`` plus a growing random walk, stored like ``first``."""
    steps = scale * np.abs(first).mean() * rng.standard_normal((count, *first.shape))
    return (first.astype(np.float64) + np.cumsum(steps, axis=0)).astype(first.dtype)


def scipy_stability(a, b):
    """The definition: mean cosine of matching columns of the tall polar factors U·Vh."""
    q = []
    for x in (a, b):
        x = np.asarray(x, np.float64)
        x = x if x.shape[0] >= x.shape[1] else x.T
        u, _, vh = scipy.linalg.svd(x, full_matrices=False)
        q.append(u @ vh)
    return np.mean(np.sum(q[0] * q[1], axis=0))


def naive_gram_stability(a, b):
    """The Gram formula with no fallback: Q = A·V·Σ⁻¹·Vᵀ from eigh(AᵀA)."""
    q = []
    for x in (a, b):
        x = np.asarray(x, np.float64)
        w, v = np.linalg.eigh(x.T @ x)
        q.append(x @ (v / np.sqrt(w)) @ v.T)
    return np.mean(np.sum(q[0] * q[1], axis=0))


@pytest.mark.parametrize("shape", [(60, 40), (40, 40), (30, 70)], ids=["tall", "square", "wide"])
def test_values_topk_and_stability_match_scipy_on_well_conditioned_matrices(shape):
    rng = np.random.default_rng(0)
    r = min(shape)
    a = drifting(with_spectrum(np.geomspace(3.0, 0.3, r), *shape, rng), 5, rng)
    result = series_svd(a, k=4)
    for t in range(len(a)):
        u, s, vh = scipy.linalg.svd(a[t].astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(result.S[t], s, rtol=0, atol=1e-12 * s[0])
        np.testing.assert_allclose(np.abs(np.sum(result.U[t] * u[:, :4], 0)), 1, atol=1e-9)
        np.testing.assert_allclose(np.abs(np.sum(result.Vh[t] * vh[:4], 1)), 1, atol=1e-9)
    expected = [scipy_stability(a[t - 1], a[t]) for t in range(1, len(a))]
    assert np.isnan(result.stability[0])
    np.testing.assert_allclose(result.stability[1:], expected, rtol=0, atol=1e-9)
    assert 1 - result.stability[1:].max() > 1e-6  # the bases did move: the check can fail


def test_chunks_carry_the_previous_polar_factor_bitwise():
    rng = np.random.default_rng(1)
    a = drifting(with_spectrum(np.geomspace(2.0, 0.5, 20), 30, 20, rng), 6, rng)
    whole = series_svd(a, k=3)
    first = series_svd(a[:2], k=3)
    rest = series_svd(a[2:], k=3, previous=first.last, max_bytes=1)  # one snapshot at a time
    np.testing.assert_array_equal(np.concatenate([first.stability, rest.stability]),
                                  whole.stability)
    np.testing.assert_array_equal(np.concatenate([first.S, rest.S]), whole.S)


def test_ill_conditioned_snapshots_take_the_exact_path():
    rng = np.random.default_rng(2)
    spectrum = np.concatenate([np.geomspace(1.0, 1e-2, 39), [1e-7]])  # κ = 1e7
    first, turn = (with_spectrum(spectrum, 60, 40, rng, dtype=np.float64) for _ in range(2))
    a = np.stack([first + 1e-6 * t * turn for t in range(3)]).astype(np.float32)
    naive_error = abs(naive_gram_stability(a[0], a[1]) - scipy_stability(a[0], a[1]))
    assert naive_error > 1e-7  # the Gram formula alone is wrong here ...
    result = series_svd(a, k=2)
    expected = [scipy_stability(a[t - 1], a[t]) for t in range(1, len(a))]
    np.testing.assert_allclose(result.stability[1:], expected, rtol=0, atol=1e-9)  # ... ours not


def test_the_error_estimate_bounds_the_gram_path_on_known_spectra():
    """The rule's premise: the Gram-path error stays below ERROR_FACTOR·eps·mean (σ_1/σ_i)²."""
    rng = np.random.default_rng(3)
    for spectrum in (np.geomspace(1, 1e-3, 48), np.r_[np.ones(47), 1e-4], np.geomspace(1, 1e-5, 48)):
        a = drifting(with_spectrum(spectrum, 96, 48, rng), 2, rng, scale=1e-3)
        s = np.stack([scipy.linalg.svdvals(x.astype(np.float64)) for x in a])
        bound = series.ERROR_FACTOR * EPS64 * ((s[:, :1] / s) ** 2).mean(1).max()
        error = abs(naive_gram_stability(a[0], a[1]) - scipy_stability(a[0], a[1]))
        assert error <= bound, (error, bound)


def test_zero_and_nan_snapshots_have_no_basis():
    rng = np.random.default_rng(4)
    a = drifting(with_spectrum(np.geomspace(2, 1, 8), 12, 8, rng), 5, rng)
    a[0] = 0
    a[3, 2, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="1 of 5 matrices hold NaN"):
        result = series_svd(a, k=2)
    assert (result.S[0] == 0).all() and np.isnan(result.U[0]).all()
    assert np.isnan(result.S[3]).all()
    stability = result.stability
    assert np.isnan(stability[[0, 1, 3, 4]]).all() and np.isfinite(stability[2])
    np.testing.assert_allclose(stability[2], scipy_stability(a[1], a[2]), atol=1e-9)
    with pytest.warns(RuntimeWarning):
        assert series_svd(a[3:4], k=2).last is None


def test_float64_storage_always_takes_the_exact_path(monkeypatch):
    rng = np.random.default_rng(5)
    a = drifting(with_spectrum(np.geomspace(2, 1, 10), 16, 10, rng, dtype=np.float64), 3, rng)
    monkeypatch.setattr(series, "_gram_path", None)  # would fail if called
    result = series_svd(a, k=2)
    np.testing.assert_allclose(result.stability[1:], [scipy_stability(a[0], a[1]),
                                                      scipy_stability(a[1], a[2])], atol=1e-12)


def test_values_only():
    rng = np.random.default_rng(6)
    a = with_spectrum(np.geomspace(2, 1, 10), 16, 10, rng)[None]
    result = series_svd(a, k=0)
    assert result.U is None and result.stability is None and result.last is None
    np.testing.assert_allclose(result.S[0], scipy.linalg.svdvals(a[0].astype(np.float64)),
                               atol=1e-12)


def test_torch_code_path_that_cuda_runs_agrees_with_numpy(monkeypatch):
    # On CUDA the chunk is a torch tensor; run that same code on CPU tensors.
    rng = np.random.default_rng(7)
    a = drifting(with_spectrum(np.geomspace(2, 0.2, 20), 30, 20, rng), 4, rng)
    a[2] = with_spectrum(np.r_[np.ones(19), 1e-7], 30, 20, rng)  # one for the exact path
    reference = series_svd(a, k=3)
    load = series.load_tall
    monkeypatch.setattr(series, "load_tall", lambda *args: torch.as_tensor(load(*args)))
    result = series_svd(a, k=3)
    assert isinstance(result.last.q, torch.Tensor)
    for name in ("S", "stability"):
        np.testing.assert_allclose(getattr(result, name), getattr(reference, name), atol=1e-12)
    np.testing.assert_allclose(np.abs((result.U * reference.U).sum(1)), 1, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_the_cpu():
    rng = np.random.default_rng(8)
    a = drifting(with_spectrum(np.geomspace(2, 0.2, 64), 128, 64, rng), 4, rng)
    cpu = series_svd(a, k=8)
    gpu = series_svd(a, k=8, device="cuda")
    assert isinstance(gpu.S, np.ndarray)  # numpy in, numpy out
    np.testing.assert_allclose(gpu.S, cpu.S, atol=1e-12)
    np.testing.assert_allclose(gpu.stability, cpu.stability, atol=1e-9)


def test_bad_k():
    with pytest.raises(ValueError, match=r"k must be an int in \[0, min\(m, n\)\] = \[0, 3\]"):
        series_svd(np.ones((1, 3, 5), np.float32), k=4)
