"""Metrics against closed forms, plain-loop references and numpy's own matrix norms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra.core import metrics as M


def random_spectra(shape, seed=0):
    """Sorted-descending positive spectra of the given (..., r) shape."""
    rng = np.random.default_rng(seed)
    return -np.sort(-rng.gamma(0.5, size=shape), axis=-1)


def orthonormal(d, k, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0]


# ---------------------------------------------------------------- ranks: closed forms


def test_identity_has_every_rank_equal_to_n():
    s = np.ones(16)
    assert M.effective_rank(s) == pytest.approx(16, rel=1e-14)
    assert M.stable_rank(s) == 16
    assert M.numerical_rank(s, shape=(16, 16)) == 16
    assert M.explained_variance_rank(s, tau=0.9) == math.ceil(0.9 * 16)
    assert M.condition_number(s) == 1
    assert M.inrank_rank(s) == 16


def test_exact_rank_r_drops_the_zeros():
    s = np.array([3.0, 2.0, 1.0, 0.0, 0.0])
    p = np.array([3, 2, 1]) / 6
    assert M.effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-14)
    assert M.stable_rank(s) == pytest.approx(14 / 9, rel=1e-14)
    assert M.numerical_rank(s, shape=(5, 8)) == 3
    assert M.condition_number(s) == np.inf


@pytest.mark.parametrize("q, r", [(0.5, 10), (0.9, 64), (0.99, 300)])
def test_geometric_spectrum_matches_closed_forms(q, r):
    s = q ** np.arange(r)
    # p_i = q^i (1 - q)/(1 - q^r); H = -ln((1-q)/(1-q^r)) - ln(q)·E[i]
    mean_index = q / (1 - q) - r * q**r / (1 - q**r)
    entropy = -np.log((1 - q) / (1 - q**r)) - np.log(q) * mean_index
    assert M.effective_rank(s) == pytest.approx(np.exp(entropy), rel=1e-12)
    assert M.stable_rank(s) == pytest.approx((1 - q ** (2 * r)) / (1 - q**2), rel=1e-12)


def test_effective_and_stable_rank_match_plain_loops_on_a_batch():
    s = random_spectra((3, 4, 20))
    erank = M.effective_rank(s)
    assert erank.shape == (3, 4)
    for index in np.ndindex(3, 4):
        row = s[index]
        p = row / row.sum()
        assert erank[index] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
        assert M.stable_rank(s)[index] == pytest.approx(sum(row**2) / row[0] ** 2, rel=1e-12)


def test_numerical_rank_threshold_follows_shape_and_storage_dtype():
    # rtol = max(m, n)·eps: float32 → 100 · 1.19e-7 = 1.19e-5; float16 → 100 · 9.8e-4 = 0.098
    s = np.array([1.0, 0.2, 2e-5, 5e-6, 1e-12])
    assert M.numerical_rank(s, shape=(100, 50), dtype=np.float32) == 3
    assert M.numerical_rank(s, shape=(100, 50), dtype=torch.float32) == 3
    assert M.numerical_rank(s, shape=(100, 50), dtype=np.float64) == 5
    assert M.numerical_rank(s, shape=(100, 50), dtype=torch.float16) == 2
    assert M.numerical_rank(s, shape=(10, 5), dtype=np.float32) == 4  # 1.19e-6
    assert M.numerical_rank(s, shape=(100, 50), rtol=0.5) == 1
    assert M.numerical_rank(s, shape=(100, 50), atol=0.1) == 2


def test_explained_variance_rank_matches_a_plain_loop():
    s = random_spectra((50, 12), seed=3)
    for tau in (0.3, 0.9, 0.99, 1.0):
        got = M.explained_variance_rank(s, tau=tau)
        for row, k in zip(s, got):
            energy = row**2 / (row**2).sum()
            expected = next(j + 1 for j in range(len(row)) if energy[: j + 1].sum() >= tau - 1e-15)
            assert k == expected
    assert M.explained_variance_rank(np.array([3.0, 2.0, 1.0]), tau=0.9) == 2  # 13/14 ≥ 0.9


# ---------------------------------------------------------------- InRank rule


def official_rule_loop(s, alpha):
    """g and rank exactly as the InRank code phrases them: zero everything from index j on,
    compare the variance of what was zeroed out... with j = kept count."""
    g = []
    for j in range(1, len(s) + 1):
        kept = s.copy()
        kept[j:] = 0
        g.append(1 - np.var(s - kept) / np.var(s))
    g = np.array(g)
    return g, next(j for j in range(1, len(s) + 1) if g[j - 1] > alpha)


def test_inrank_ratio_and_rank_match_the_official_rule():
    s = random_spectra((20, 40), seed=5)
    s[:, 30:] = 0.0  # the long zero tail of a low-rank product
    g = M.inrank_explained_ratio(s)
    for alpha in (0.5, 0.9, 0.99):
        ranks = M.inrank_rank(s, alpha=alpha)
        for row, g_row, rank in zip(s, g, ranks):
            g_loop, rank_loop = official_rule_loop(row, alpha)
            np.testing.assert_allclose(g_row, g_loop, rtol=0, atol=1e-12)
            assert rank == rank_loop


def test_inrank_ratio_by_hand_and_with_torch_var():
    s = np.array([4.0, 2.0, 0.0, 0.0])  # Var = 2.75; keep 1 → tail [0, 2, 0, 0], Var 0.75
    np.testing.assert_allclose(M.inrank_explained_ratio(s), [1 - 0.75 / 2.75, 1, 1, 1])
    assert M.inrank_rank(s, alpha=0.7) == 1 and M.inrank_rank(s, alpha=0.9) == 2
    # the official code uses torch.var (unbiased); the ratio is the same
    t = torch.tensor(s)
    tail = t.clone()
    tail[:1] = 0
    assert M.inrank_explained_ratio(s)[0] == pytest.approx(float(1 - tail.var() / t.var()))


def test_inrank_ratio_dips_below_zero_on_a_flat_top():
    g = M.inrank_explained_ratio(np.array([1.0, 1.0, 1.0, 0.9]))
    assert g[0] < 0 and g[-1] == 1


def test_inrank_flat_spectra_have_no_ratio():
    assert np.isnan(M.inrank_explained_ratio(np.ones(5))).all()
    assert M.inrank_rank(np.ones(5)) == 5
    assert M.inrank_rank(np.zeros(5)) == 0


# ---------------------------------------------------------------- norms, zeros, NaN, torch


def test_norms_and_condition_match_numpy_on_real_matrices():
    a = np.random.default_rng(2).standard_normal((3, 9, 6))
    s = np.linalg.svd(a, compute_uv=False)
    frobenius = np.linalg.norm(a, "fro", axis=(1, 2))
    np.testing.assert_allclose(M.frobenius_norm(s), frobenius, rtol=1e-13)
    np.testing.assert_allclose(M.spectral_norm(s), np.linalg.norm(a, 2, axis=(1, 2)), rtol=1e-13)
    np.testing.assert_allclose(M.nuclear_norm(s), np.linalg.norm(a, "nuc", axis=(1, 2)), rtol=1e-13)
    np.testing.assert_allclose(M.stable_rank(s), (frobenius / s[:, 0]) ** 2, rtol=1e-13)
    square = a[:, :6]
    kappa = M.condition_number(np.linalg.svd(square, compute_uv=False))
    np.testing.assert_allclose(kappa, np.linalg.cond(square), rtol=1e-10)


def test_frobenius_norm_does_not_overflow():
    assert M.frobenius_norm(np.array([1e200, 1e200])) == pytest.approx(math.sqrt(2) * 1e200)


def test_zero_matrix_conventions():
    z = np.zeros(6)
    assert M.effective_rank(z) == 0 and M.stable_rank(z) == 0
    assert M.numerical_rank(z, shape=(6, 6)) == 0 and M.explained_variance_rank(z) == 0
    assert M.frobenius_norm(z) == 0 and M.spectral_norm(z) == 0 and M.nuclear_norm(z) == 0
    assert M.condition_number(z) == np.inf


def test_nan_rows_give_nan_and_leave_other_rows_alone():
    s = random_spectra((3, 8))
    s[1, 2] = np.nan
    for value in (
        M.effective_rank(s), M.stable_rank(s), M.numerical_rank(s, shape=(8, 8)),
        M.explained_variance_rank(s), M.inrank_rank(s), M.frobenius_norm(s), M.condition_number(s),
    ):
        assert np.isnan(value[1]) and np.isfinite(value[[0, 2]]).all()
    assert np.isnan(M.inrank_explained_ratio(s)[1]).all()


def test_torch_tensors_are_accepted():
    s = random_spectra((2, 10))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        t = torch.tensor(s).to(dtype)
        expected = M.effective_rank(t.double().numpy())
        assert isinstance(M.effective_rank(t), np.ndarray)
        np.testing.assert_allclose(M.effective_rank(t), expected, rtol=1e-12)
    assert M.inrank_rank(torch.tensor([4.0, 2.0, 0.0, 0.0]), alpha=0.7) == 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.explained_variance_rank(np.array([1.0, 2.0])), "sorted descending"),
        (lambda: M.inrank_rank(np.array([1.0, 2.0])), "sorted descending"),
        (lambda: M.effective_rank(np.array([1.0, -2.0])), "negative"),
        (lambda: M.explained_variance_rank(np.ones(3), tau=0.0), "tau must be in"),
        (lambda: M.inrank_rank(np.ones(3), alpha=1.0), "alpha must be in"),
        (lambda: M.numerical_rank(np.ones(3), shape=(3, 3), dtype=np.int32), "not a floating"),
        (lambda: M.stable_rank(np.float64(3.0)), "scalar"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- subspaces


def rotated_pair(angles, d=40, seed=0):
    """Bases a, b (d, k) whose principal angles are exactly ``angles``."""
    k = len(angles)
    q = orthonormal(d, 2 * k, seed)
    return q[:, :k], q[:, :k] * np.cos(angles) + q[:, k:] * np.sin(angles)


def test_principal_angles_resolve_tiny_and_large_angles():
    angles = np.array([1e-12, 1e-9, 1e-7, 1e-4, 0.3, 0.7854, 1.2, np.pi / 2 - 1e-9])
    a, b = rotated_pair(angles)
    rotation = orthonormal(len(angles), len(angles), seed=9)  # any basis of the same span
    got = M.principal_angles(a @ rotation, b)
    np.testing.assert_allclose(got, angles, rtol=1e-6, atol=2e-15)
    np.testing.assert_allclose(M.principal_angles(b, a @ rotation), got, rtol=1e-6, atol=2e-15)
    assert M.largest_principal_angle(a, b) == pytest.approx(angles[-1], abs=1e-14)


def test_principal_angles_of_different_dimensions_and_batches():
    q = orthonormal(30, 8)
    inner = q[:, :3] @ orthonormal(3, 3, seed=4)
    np.testing.assert_allclose(M.principal_angles(q[:, :5], inner), np.zeros(3), atol=1e-15)
    a, b = rotated_pair(np.array([0.1, 0.2]))
    stack = M.principal_angles(np.stack([a, a]), np.stack([b, a]))
    np.testing.assert_allclose(stack, [[0.1, 0.2], [0, 0]], atol=1e-14)
    a_bad = a.copy()
    a_bad[0, 0] = np.nan
    assert np.isnan(M.principal_angles(a_bad, b)).all()


def test_subspace_similarity():
    a, b = rotated_pair(np.array([0.0, np.pi / 2, np.pi / 3]))
    assert M.subspace_similarity(a, b) == pytest.approx((1 + 0 + 0.25) / 3, rel=1e-12)
    assert M.subspace_similarity(a, a @ orthonormal(3, 3, seed=2)) == pytest.approx(1, rel=1e-12)
    pairs = [(orthonormal(60, 4, seed), orthonormal(60, 4, seed + 100)) for seed in range(200)]
    chance = np.mean([M.subspace_similarity(a, b) for a, b in pairs])
    assert chance == pytest.approx(4 / 60, rel=0.15)


# ---------------------------------------------------------------- OIALR stability


def svd(w):
    return np.linalg.svd(w, full_matrices=False)


def test_oialr_stability_matches_the_authors_cosine_similarity():
    rng = np.random.default_rng(0)
    w_prev = rng.standard_normal((3, 50, 20))
    w_now = w_prev + 0.05 * rng.standard_normal((3, 50, 20))
    (u_p, _, vh_p), (u_n, _, vh_n) = svd(w_prev), svd(w_now)
    cos = torch.nn.CosineSimilarity(dim=0)  # the authors' measure on uvh = u @ vh
    expected = [cos(torch.tensor(a @ b), torch.tensor(c @ d)).mean().item()
                for a, b, c, d in zip(u_p, vh_p, u_n, vh_n)]
    np.testing.assert_allclose(M.oialr_stability(u_p, vh_p, u_n, vh_n), expected, rtol=1e-12)
    assert 0.9 < min(expected) < 1


def test_oialr_stability_is_signed_and_orientation_free():
    rng = np.random.default_rng(1)
    u, _, vh = svd(rng.standard_normal((40, 10)))
    assert M.oialr_stability(u, vh, u, vh) == pytest.approx(1, rel=1e-14)
    flip_first_column = np.array([-1.0] + [1.0] * 9)
    assert M.oialr_stability(u, vh, u, vh * flip_first_column) == pytest.approx(8 / 10, rel=1e-12)
    u2, _, vh2 = svd(rng.standard_normal((40, 10)))
    transposed = M.oialr_stability(vh.T, u.T, vh2.T, u2.T)  # the SVDs of the wide Wᵀ
    assert transposed == pytest.approx(M.oialr_stability(u, vh, u2, vh2), rel=1e-13)


def test_oialr_stability_of_top_k_triplets_with_one_vector_turning_out_of_the_subspace():
    rng = np.random.default_rng(4)
    u = orthonormal(30, 6, seed=5)
    _, _, vh = svd(rng.standard_normal((6, 20)))
    c, s = np.cos(0.3), np.sin(0.3)  # u_1 turns towards u_3 (outside the top 2), u_3 to −u_1
    u_now = u.copy()
    u_now[:, [0, 2]] = u[:, [0, 2]] @ np.array([[c, -s], [s, c]])
    top2 = M.oialr_stability(u[:, :2], vh[:2], u_now[:, :2], vh[:2])
    assert top2 == pytest.approx((1 + c) / 2, rel=1e-13)
    all_six = M.oialr_stability(u, vh, u_now, vh)
    assert all_six == pytest.approx((6 - 2 + 2 * c) / 6, rel=1e-13)


def test_oialr_stability_ignores_the_svds_sign_choices():
    w = np.random.default_rng(3).standard_normal((12, 7))
    u, _, vh = svd(w)
    signs = np.array([1, -1, 1, -1, -1, 1, -1.0])
    flipped = M.polar_factor(u * signs, signs[:, None] * vh)
    np.testing.assert_allclose(flipped, M.polar_factor(u, vh), atol=1e-14)
    assert M.oialr_stability(u, vh, u * signs, signs[:, None] * vh) == pytest.approx(1, rel=1e-14)
