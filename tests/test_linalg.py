"""batched_svd against scipy.linalg.svd on the same matrices, and its robustness contract."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import ThreadpoolController, threadpool_info

from spectra.core import linalg
from spectra.core.linalg import SVD, batched_svd

DENSE_METHODS = ["gesdd", "gesvd", "gram"]
ALL_METHODS = DENSE_METHODS + ["randomized"]


def with_spectrum(s, m, n, batch=1, seed=0, dtype=np.float64):
    """(batch, m, n) matrices U diag(s) Vᵀ with random orthonormal U, V."""
    rng = np.random.default_rng(seed)
    r = len(s)
    u = np.linalg.qr(rng.standard_normal((batch, m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((batch, n, r)))[0]
    return ((u * np.asarray(s, dtype=np.float64)) @ v.swapaxes(1, 2)).astype(dtype)


def scipy_svd(a):
    """Reference reduced SVD of each matrix of the stack, in float64."""
    parts = [scipy.linalg.svd(np.asarray(x, np.float64), full_matrices=False) for x in a]
    u, s, vh = (np.stack(p) for p in zip(*parts))
    return u, s, vh


def assert_matches_reference(result: SVD, a, k=None, s_tol=1e-12, vec_tol=1e-9):
    """S within s_tol·σ_1 of scipy; U, Vh orthonormal, reconstructing A (or its best rank-k
    part), and each vector parallel to scipy's (well-separated spectra only)."""
    u_ref, s_ref, vh_ref = scipy_svd(a)
    k = k or s_ref.shape[1]
    top = s_ref[:, :1]
    s_error = np.abs(result.S - s_ref[:, :k]) / top
    assert s_error.max() <= s_tol, s_error.max()
    if result.U is None:
        return
    eye = np.broadcast_to(np.eye(k), (len(a), k, k))
    np.testing.assert_allclose(result.U.swapaxes(1, 2) @ result.U, eye, atol=vec_tol)
    np.testing.assert_allclose(result.Vh @ result.Vh.swapaxes(1, 2), eye, atol=vec_tol)
    best = (u_ref[:, :, :k] * s_ref[:, None, :k]) @ vh_ref[:, :k]
    rebuilt = (result.U * result.S[:, None, :]) @ result.Vh
    rebuild_error = np.abs(rebuilt - best).max(axis=(1, 2)) / top[:, 0]
    assert rebuild_error.max() <= vec_tol, rebuild_error.max()
    cos_u = np.abs((result.U * u_ref[:, :, :k]).sum(1))
    cos_v = np.abs((result.Vh * vh_ref[:, :k]).sum(2))
    assert np.minimum(cos_u, cos_v).min() >= 1 - vec_tol


# Well-separated singular values (neighbours 17% apart) spanning two decades.
SEPARATED = np.geomspace(10.0, 0.1, 30)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compute", ["values", "full"])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_methods_agree_with_scipy(method, compute, dtype):
    a = with_spectrum(SEPARATED, 50, 30, batch=3, dtype=dtype)
    result = batched_svd(a, compute=compute, method=method)
    assert result.S.dtype == np.float64 and result.S.shape == (3, 30)
    s_tol = 1e-6 if method == "gram" else 1e-12
    assert_matches_reference(result, a, s_tol=s_tol, vec_tol=1e-9)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_topk_agrees_with_scipy(method):
    a = with_spectrum(SEPARATED, 60, 30, batch=3, dtype=np.float32)
    result = batched_svd(a, compute="topk", k=4, method=method)
    assert result.U.shape == (3, 60, 4) and result.Vh.shape == (3, 4, 30)
    assert_matches_reference(result, a, k=4, s_tol=1e-6, vec_tol=1e-6)


def test_auto_resolves_a_float64_tail_down_to_1e_12():
    spectrum = np.geomspace(1.0, 1e-12, 40)
    a = with_spectrum(spectrum, 60, 40, batch=2)
    auto = batched_svd(a).S
    np.testing.assert_allclose(auto, scipy_svd(a)[1], rtol=1e-3, atol=0)
    # The test can fail: the float64 Gram matrix cannot see below ~1e-8·σ_1.
    gram = batched_svd(a, method="gram").S
    assert np.abs(gram[:, -10:] / spectrum[-10:] - 1).max() > 1.0


def test_gram_on_float32_is_exact_to_storage_precision():
    a = with_spectrum(np.geomspace(1.0, 1e-7, 64), 128, 64, batch=2, dtype=np.float32)
    s_ref = scipy_svd(a)[1]
    result = batched_svd(a, method="gram").S
    noise_floor = 128 * np.finfo(np.float32).eps
    assert np.abs(result - s_ref).max() < 1e-3 * noise_floor


@pytest.mark.parametrize(
    "spectrum",
    [np.geomspace(1.0, 1e-5, 30), np.concatenate([np.geomspace(1.0, 1e-3, 20), np.zeros(10)])],
    ids=["wide-range", "rank-deficient"],
)
def test_gram_vectors_are_orthonormal_and_rebuild_the_matrix(spectrum):
    a = with_spectrum(spectrum, 50, 30, batch=2, dtype=np.float32)
    result = batched_svd(a, compute="full", method="gram")
    eye = np.broadcast_to(np.eye(30), (2, 30, 30))
    np.testing.assert_allclose(result.U.swapaxes(1, 2) @ result.U, eye, rtol=0, atol=1e-13)
    np.testing.assert_allclose(result.Vh @ result.Vh.swapaxes(1, 2), eye, rtol=0, atol=1e-13)
    rebuilt = (result.U * result.S[:, None, :]) @ result.Vh
    np.testing.assert_allclose(rebuilt, a, rtol=0, atol=1e-8)  # gram's floor, ~sqrt(n·eps64)


def test_randomized_meets_its_residual_tolerance(monkeypatch):
    a = with_spectrum(1.0 / np.arange(1, 301), 400, 300, batch=2, dtype=np.float32)
    tol = 1e-8
    monkeypatch.setitem(linalg._KERNELS, "gram", None)  # converging must not need the fallback
    result = batched_svd(a, compute="topk", k=5, method="randomized", tol=tol)
    a64 = a.astype(np.float64)
    residual = np.linalg.norm(
        a64 @ result.Vh.swapaxes(1, 2) - result.U * result.S[:, None, :], axis=1
    )
    assert residual.max() <= tol * result.S[:, 0].min()
    np.testing.assert_allclose(result.S, scipy_svd(a)[1][:, :5], rtol=0, atol=tol)


def test_randomized_falls_back_to_exact_when_it_cannot_converge():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 300, 200)).astype(np.float32)  # flat spectrum: slow iteration
    calls = []
    original = linalg._KERNELS["gram"]

    def spy(x, compute, k):
        calls.append(len(x))
        return original(x, compute, k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(linalg._KERNELS, "gram", spy)
        result = batched_svd(a, compute="topk", k=5, method="randomized")
    assert calls == [2]
    assert_matches_reference(result, a, k=5, s_tol=1e-9, vec_tol=1e-6)


def test_randomized_is_deterministic_given_the_seed():
    a = with_spectrum(1.0 / np.arange(1, 41), 80, 40, batch=2, dtype=np.float32)
    first = batched_svd(a, compute="topk", k=3, method="randomized", seed=7)
    again = batched_svd(a, compute="topk", k=3, method="randomized", seed=7)
    np.testing.assert_array_equal(first.U, again.U)
    np.testing.assert_array_equal(first.S, again.S)


def test_nan_matrix_gives_nan_row_one_warning_and_leaves_others_right():
    a = with_spectrum(SEPARATED, 40, 30, batch=4, dtype=np.float32)
    a[1, 3, 4] = np.nan
    a[2, 0, 0] = np.inf
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = batched_svd(a, compute="full")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["2 of 4 matrices hold NaN or Inf; their results are NaN"]
    for array in (result.S, result.U, result.Vh):
        assert np.isnan(array[[1, 2]]).all() and np.isfinite(array[[0, 3]]).all()
    good = SVD(result.S[[0, 3]], result.U[[0, 3]], result.Vh[[0, 3]])
    assert_matches_reference(good, a[[0, 3]], s_tol=1e-6)


@pytest.mark.parametrize(
    "compute, method, k",
    [("values", "gesdd", None), ("values", "gram", None), ("full", "gram", None),
     ("topk", "randomized", 3), ("full", "gesvd", None)],
)
def test_chunking_does_not_change_results(compute, method, k):
    a = with_spectrum(SEPARATED[:20], 30, 20, batch=5, dtype=np.float32)
    whole = batched_svd(a, compute=compute, method=method, k=k)
    one_at_a_time = batched_svd(a, compute=compute, method=method, k=k, max_bytes=1)
    for name in ("S", "U", "Vh"):
        x, y = getattr(whole, name), getattr(one_at_a_time, name)
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_chunking_bounds_the_working_set():
    a = np.random.default_rng(0).standard_normal((64, 128, 128)).astype(np.float32)
    stack_float64 = a.size * 8  # 8.4 MB: what converting the whole stack at once would take
    tracemalloc.start()
    batched_svd(a, method="gesdd", max_bytes=2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < stack_float64 / 4


@pytest.mark.parametrize("compute, k", [("values", None), ("full", None), ("topk", 2)])
@pytest.mark.parametrize("method", ["gesdd", "gram"])
def test_wide_matrices(compute, k, method):
    a = with_spectrum(SEPARATED[:20], 20, 50, batch=2, dtype=np.float32)
    result = batched_svd(a, compute=compute, k=k, method=method)
    if compute != "values":
        r = k or 20
        assert result.U.shape == (2, 20, r) and result.Vh.shape == (2, r, 50)
    assert_matches_reference(result, a, k=k, s_tol=1e-6, vec_tol=1e-8)


def test_falls_back_when_the_primary_driver_raises(monkeypatch):
    a = with_spectrum(SEPARATED, 40, 30, batch=3, dtype=np.float64)
    used = []
    gesvd = linalg._KERNELS["gesvd"]

    def broken(x, compute, k):
        raise np.linalg.LinAlgError("SVD did not converge")

    def spy(x, compute, k):
        used.append(len(x))
        return gesvd(x, compute, k)

    monkeypatch.setitem(linalg._KERNELS, "gesdd", broken)
    monkeypatch.setitem(linalg._KERNELS, "gesvd", spy)
    result = batched_svd(a, compute="full", method="gesdd")
    assert used == [1, 1, 1]
    assert_matches_reference(result, a)


def test_a_non_finite_result_is_retried(monkeypatch):
    a = with_spectrum(SEPARATED, 40, 30, batch=3)
    gesdd = linalg._KERNELS["gesdd"]

    def spoils_the_second(x, compute, k):
        s, u, v = gesdd(x, compute, k)
        if len(x) == 3:
            s[1] = np.nan
        return s, u, v

    monkeypatch.setitem(linalg._KERNELS, "gesdd", spoils_the_second)
    assert_matches_reference(batched_svd(a, method="gesdd"), a)


def test_matrices_no_method_can_do_are_nan_with_a_warning(monkeypatch):
    def broken(x, compute, k):
        raise torch.linalg.LinAlgError("broken")

    for name in ("gesdd", "gesvd"):
        monkeypatch.setitem(linalg._KERNELS, name, broken)
    a = with_spectrum(SEPARATED, 40, 30, batch=2)
    with pytest.warns(RuntimeWarning, match="2 of 2 matrices failed with every method"):
        result = batched_svd(a, method="gesdd")
    assert np.isnan(result.S).all()


@pytest.mark.parametrize(
    "compute, method, k",
    [("values", "gesdd", None), ("full", "gram", None), ("full", "gesdd", None),
     ("topk", "randomized", 2), ("topk", "gram", 2)],
)
def test_zero_matrices_give_zeros(compute, method, k):
    a = np.zeros((2, 12, 7), dtype=np.float32)
    result = batched_svd(a, compute=compute, method=method, k=k)
    assert np.array_equal(result.S, np.zeros_like(result.S))
    if result.U is not None:
        eye = np.broadcast_to(np.eye(result.S.shape[1]), (2,) + (result.S.shape[1],) * 2)
        np.testing.assert_allclose(result.U.swapaxes(1, 2) @ result.U, eye, atol=1e-12)


def test_torch_in_torch_out_any_float_dtype():
    a = with_spectrum(SEPARATED[:10], 16, 10, batch=2, dtype=np.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = torch.from_numpy(a).to(dtype)
        result = batched_svd(tensor, compute="full")
        assert isinstance(result.S, torch.Tensor) and result.S.dtype == torch.float64
        rebuilt = (result.U * result.S[:, None, :]) @ result.Vh
        torch.testing.assert_close(rebuilt, tensor.double(), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "compute, method, k",
    [("values", "gesdd", None), ("full", "gesdd", None), ("values", "gram", None),
     ("full", "gram", None), ("topk", "gram", 3), ("topk", "randomized", 3)],
)
def test_torch_kernels_that_cuda_runs_agree_with_scipy(monkeypatch, compute, method, k):
    # On CUDA the kernels work on torch tensors; run those same code paths on CPU tensors.
    load = linalg.load_tall
    monkeypatch.setattr(linalg, "load_tall", lambda *args: torch.as_tensor(load(*args)))
    a = with_spectrum(SEPARATED, 50, 30, batch=3, dtype=np.float32)
    result = batched_svd(a, compute=compute, method=method, k=k)
    assert_matches_reference(result, a, k=k, s_tol=1e-6, vec_tol=1e-6 if k else 1e-8)


class LazyStack:
    """A (B, m, n) array-like that records what is read, like a zarr array."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def test_lazy_stacks_are_read_one_chunk_at_a_time():
    a = with_spectrum(SEPARATED[:20], 30, 20, batch=6, dtype=np.float32)
    lazy = LazyStack(a)
    plan = linalg._make_plan(a, "values", None, "gram", "cpu", None, 0)
    per_matrix = 8 * linalg._work_elements(30, 20, plan)
    result = batched_svd(lazy, method="gram", max_bytes=2 * per_matrix)
    assert lazy.reads == [slice(0, 2), slice(2, 4), slice(4, 6)]
    np.testing.assert_array_equal(result.S, batched_svd(a, method="gram").S)


def test_an_empty_stack_gives_empty_results():
    result = batched_svd(np.ones((0, 5, 3)), compute="full")
    assert result.S.shape == (0, 3) and result.U.shape == (0, 5, 3) and result.Vh.shape == (0, 3, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compute="vectors"), "compute must be one of"),
        (dict(method="jacobi"), "method must be one of"),
        (dict(compute="topk"), "k must be an int"),
        (dict(compute="topk", k=0), "k must be an int"),
        (dict(compute="topk", k=11), r"\[1, 10\]"),
        (dict(compute="values", k=3), "k is only used with compute='topk'"),
        (dict(method="randomized"), "randomized' computes only"),
        (dict(max_bytes=0), "max_bytes must be positive"),
        (dict(device="mps"), "device must be 'cpu' or 'cuda'"),
        (dict(compute="topk", k=2, tol=-1.0), "tol must be positive"),
        (dict(threads=0), "threads must be None or an int"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batched_svd(np.ones((2, 12, 10)), **kwargs)


@pytest.mark.parametrize(
    "a, match",
    [
        (np.ones((12, 10)), r"\(B, m, n\) stack"),
        (np.ones((2, 3, 4, 5)), r"\(B, m, n\) stack"),
        (np.ones((2, 3, 4), dtype=np.int64), "accepted: float16"),
        (np.ones((2, 0, 4)), "at least one row"),
    ],
)
def test_bad_input_names_the_problem(a, match):
    with pytest.raises(ValueError, match=match):
        batched_svd(a)


def test_auto_uses_gesdd_for_float64_and_gram_for_float32(monkeypatch):
    used = []
    for name in ("gesdd", "gram"):
        kernel = linalg._KERNELS[name]

        def spy(x, compute, k, name=name, kernel=kernel):
            used.append(name)
            return kernel(x, compute, k)

        monkeypatch.setitem(linalg._KERNELS, name, spy)
    batched_svd(np.ones((1, 8, 8)))
    batched_svd(np.ones((1, 8, 8), dtype=np.float32))
    assert used == ["gesdd", "gram"]


def test_blas_threads_are_limited_during_the_call_and_restored(monkeypatch):
    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    seen = []
    gram = linalg._KERNELS["gram"]

    def spy(x, compute, k):
        seen.append(blas_threads())
        return gram(x, compute, k)

    monkeypatch.setitem(linalg._KERNELS, "gram", spy)
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        batched_svd(np.ones((1, 4, 4), dtype=np.float32), threads=1)
        assert seen == [{1}] and blas_threads() == {2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_cuda_agrees_with_scipy(method):
    a = with_spectrum(SEPARATED, 50, 30, batch=3, dtype=np.float32)
    tensor = torch.from_numpy(a).cuda()
    result = batched_svd(tensor, compute="topk", k=4, method=method, device="cuda")
    assert result.S.device.type == "cuda"
    cpu = SVD(*(x.cpu().numpy() for x in (result.S, result.U, result.Vh)))
    assert_matches_reference(cpu, a, k=4, s_tol=1e-6, vec_tol=1e-6)
