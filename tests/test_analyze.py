"""analyze() on stores whose spectra and bases are known in closed form; caching; odd input."""

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

import spectra
import spectra.analysis.extend as extend_module
from conftest import TinyNet, train_steps
from spectra.analysis.analyzer import analyze, singular_values
from spectra.store import MatrixSpec, create_run

M, N = 40, 30
SPECTRUM = np.array([10.0, 8.0, 3.0, 2.0, 1.5, 1.0] + [0.5 * 0.8**i for i in range(N - 6)])
ANGLES = np.array([0.0, 1e-7, 0.01, 0.3, 0.3, 1.2])  # rotation of the top left vector at each snapshot


def _basis(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _rotated(u, theta):
    """u with its first column turned by theta towards its 10th (outside the top-2 subspace)."""
    out = u.copy()
    out[:, 0] = np.cos(theta) * u[:, 0] + np.sin(theta) * u[:, 9]
    out[:, 9] = -np.sin(theta) * u[:, 0] + np.cos(theta) * u[:, 9]
    return out


@pytest.fixture
def known_store(tmp_path):
    """W_0 = 0 and W_t = U_t diag(SPECTRUM·(t+1)) Vᵀ: ΔW_t = W_t with known σ and bases."""
    rng = np.random.default_rng(0)
    u, v = _basis(rng, M), _basis(rng, N)[:, :N]
    path = tmp_path / "known.zarr"
    writer = create_run(path, [MatrixSpec("w", (M, N), (M, N), "linear")],
                        {"w": np.zeros((M, N), np.float64)})
    for t, theta in enumerate(ANGLES):
        w = _rotated(u, theta)[:, :N] @ np.diag(SPECTRUM * (t + 1)) @ v.T
        writer.append(10 * t, {"w": w})
    return path


def _values(frame, metric, target="updates", param="w"):
    rows = frame[(frame.metric == metric) & (frame.target == target) & (frame.param == param)]
    return rows.sort_values("step")["value"].to_numpy()


def test_per_snapshot_metrics_match_closed_forms(known_store):
    frame = analyze(known_store, k=2, quiet=True)
    assert list(frame.columns) == ["step", "param", "target", "metric", "value"]
    np.testing.assert_array_equal(np.unique(frame.step), 10 * np.arange(len(ANGLES)))
    p = SPECTRUM / SPECTRUM.sum()
    erank = np.exp(-(p * np.log(p)).sum())
    for target in ("updates", "weights"):
        np.testing.assert_allclose(_values(frame, "effective_rank", target), erank, rtol=1e-9)
        np.testing.assert_allclose(_values(frame, "stable_rank", target),
                                   (SPECTRUM**2).sum() / SPECTRUM[0] ** 2, rtol=1e-9)
        np.testing.assert_array_equal(_values(frame, "numerical_rank", target), N)
        energy = np.cumsum(SPECTRUM**2) / (SPECTRUM**2).sum()
        np.testing.assert_array_equal(_values(frame, "explained_variance_rank", target),
                                      np.argmax(energy >= 0.9) + 1)
        scale = np.arange(1, len(ANGLES) + 1)
        np.testing.assert_allclose(_values(frame, "sigma_1", target), 10 * scale, rtol=1e-9)
        np.testing.assert_allclose(_values(frame, "sigma_3", target), 3 * scale, rtol=1e-9)
        np.testing.assert_allclose(_values(frame, "frobenius_norm", target),
                                   np.linalg.norm(SPECTRUM) * scale, rtol=1e-9)
        np.testing.assert_allclose(_values(frame, "nuclear_norm", target),
                                   SPECTRUM.sum() * scale, rtol=1e-9)


def test_subspace_metrics_match_known_rotations(known_store):
    frame = analyze(known_store, k=2, targets=["weights"], quiet=True)
    step_angles = np.abs(np.diff(ANGLES))
    prev = _values(frame, "left_angle_prev", "weights")
    assert np.isnan(prev[0])
    np.testing.assert_allclose(prev[1:], step_angles, rtol=1e-6, atol=1e-12)
    assert abs(prev[1] - 1e-7) < 1e-12  # a 1e-7 rad turn is resolved, not lost to rounding
    np.testing.assert_allclose(_values(frame, "right_angle_prev", "weights")[1:], 0, atol=1e-9)
    last = ANGLES[-1] - ANGLES
    np.testing.assert_allclose(_values(frame, "left_angle_last", "weights"), np.abs(last), atol=1e-9)
    np.testing.assert_allclose(_values(frame, "left_similarity_last", "weights"),
                               (1 + np.cos(last) ** 2) / 2, rtol=1e-9)
    # OIALR full-basis stability: Q_t = U_t Vᵀ, mean column cosine = (N − 2 + 2 cos Δθ) / N
    stability = _values(frame, "oialr_stability_prev", "weights")
    np.testing.assert_allclose(stability[1:], (N - 2 + 2 * np.cos(step_angles)) / N, rtol=1e-9)
    # top-2 version: (1 + cos Δθ) / 2
    np.testing.assert_allclose(_values(frame, "topk_stability_prev", "weights")[1:],
                               (1 + np.cos(step_angles)) / 2, rtol=1e-9)


def test_oialr_stability_matches_the_definition_on_real_weights(tiny, tmp_path):
    """Against polar factors computed directly with scipy on the recorded weights."""
    model, opt, gen = tiny
    with spectra.Recorder(model, tmp_path / "r.zarr", embeddings=True) as rec:
        train_steps(model, opt, 4, gen, lambda k, loss: rec.step())
    run = spectra.open_run(tmp_path / "r.zarr")
    frame = analyze(run, k=2, targets=["weights"], quiet=True)
    for name in run.params:
        q = []
        for t in range(len(run)):
            w = run.weights(name, t).astype(np.float64)
            w = w if w.shape[0] >= w.shape[1] else w.T
            u, _, vh = scipy.linalg.svd(w, full_matrices=False)
            q.append(u @ vh)
        expected = [np.mean(np.sum(a * b, axis=0)) for a, b in zip(q[:-1], q[1:])]
        np.testing.assert_allclose(_values(frame, "oialr_stability_prev", "weights", name)[1:],
                                   expected, rtol=1e-6, atol=1e-9)


def test_conv_linear_embedding_store_against_scipy(tiny, tmp_path):
    model, opt, gen = tiny
    with spectra.Recorder(model, tmp_path / "r.zarr", embeddings=True, every=2) as rec:
        train_steps(model, opt, 6, gen, lambda k, loss: rec.step())
    run = spectra.open_run(tmp_path / "r.zarr")
    assert {run.kind(p) for p in run.params} == {"embedding", "conv", "linear"}
    frame = analyze(run, k=1, quiet=True)
    for name in run.params:
        for t, step in enumerate(run.steps):
            for target, matrix in (("weights", run.weights(name, t)), ("updates", run.updates(name, t))):
                s = scipy.linalg.svdvals(matrix.astype(np.float64))
                got = frame[(frame.param == name) & (frame.target == target) & (frame.step == step)]
                got = got.set_index("metric")["value"]
                if s[0] == 0:
                    assert got["effective_rank"] == 0
                    continue
                np.testing.assert_allclose(got["spectral_norm"], s[0], rtol=1e-5)
                np.testing.assert_allclose(got["stable_rank"], (s**2).sum() / s[0] ** 2, rtol=1e-5)
    steps, sv = singular_values(run, "conv.weight", "weights", k=1)
    np.testing.assert_array_equal(steps, run.steps)
    np.testing.assert_allclose(sv[-1], scipy.linalg.svdvals(run.weights("conv.weight", -1)), rtol=1e-5)


class CountingSVD:
    def __init__(self, monkeypatch):
        self.matrices = 0
        original = extend_module.series_svd

        def counted(a, *args, **kwargs):
            self.matrices += len(a)
            return original(a, *args, **kwargs)

        monkeypatch.setattr(extend_module, "series_svd", counted)


def test_second_call_reuses_the_cache_and_picks_up_new_snapshots(known_store, monkeypatch):
    first = analyze(known_store, k=2, quiet=True)
    counter = CountingSVD(monkeypatch)
    second = analyze(known_store, k=2, quiet=True)
    assert counter.matrices == 0
    pd.testing.assert_frame_equal(first, second)

    writer = spectra.store.resume_run(known_store)
    w_last = spectra.open_run(known_store).weights("w", -1)
    writer.append(100, {"w": 2 * w_last})
    third = analyze(known_store, k=2, quiet=True)
    # one new snapshot per target, plus the previous one re-read to anchor the "prev" basis
    assert counter.matrices == 2 * 2
    np.testing.assert_allclose(_values(third, "sigma_1")[-1], 2 * 10 * len(ANGLES), rtol=1e-9)
    # everything about the old snapshots is unchanged, except comparisons with the (new) last
    pd.testing.assert_frame_equal(_without_last(third[third.step < 100]), _without_last(first))
    assert counter.matrices == 4  # nothing else was recomputed
    analyze(known_store, k=3, quiet=True)  # another k recomputes its own cache
    assert counter.matrices == 4 + 2 * (len(ANGLES) + 1)


def _without_last(frame):
    frame = frame.astype({"param": str, "target": str, "metric": str})
    frame = frame[~frame.metric.str.endswith("_last")]
    return frame.sort_values(["param", "target", "metric", "step"]).reset_index(drop=True)


def test_a_tiny_memory_budget_gives_the_same_frame(known_store, tmp_path):
    import shutil
    copy = tmp_path / "copy.zarr"
    shutil.copytree(known_store, copy)
    whole = analyze(known_store, k=2, quiet=True)
    chunked = analyze(copy, k=2, max_bytes=1, quiet=True)  # one snapshot per chunk everywhere
    pd.testing.assert_frame_equal(whole, chunked, check_exact=False, rtol=1e-12, atol=1e-14)


def test_uncommitted_rows_are_not_analyzed(known_store):
    import zarr
    root = zarr.open_group(known_store, mode="r+")
    root["params/w/updates"].resize((len(ANGLES) + 1, M, N))
    root["steps"].resize((len(ANGLES) + 1,))
    frame = analyze(known_store, k=0, quiet=True)
    assert frame.step.max() == 10 * (len(ANGLES) - 1)


def test_nan_snapshot_gives_nan_rows_and_a_warning(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "nan.zarr"
    w0 = rng.standard_normal((12, 9)).astype(np.float32)
    writer = create_run(path, [MatrixSpec("w", (12, 9), (12, 9), "linear")], {"w": w0})
    bad = w0.copy()
    bad[3, 3] = np.nan
    for step, w in enumerate([w0, w0 * 2, bad, w0 * 3]):
        writer.append(step, {"w": w})
    with pytest.warns(RuntimeWarning, match="NaN"):
        frame = analyze(path, k=2, quiet=True)
    erank = _values(frame, "effective_rank", "weights")
    assert np.isnan(erank[2]) and np.isfinite(erank[[0, 1, 3]]).all()
    assert np.isnan(_values(frame, "left_similarity_prev", "weights")[[2, 3]]).all()
    s = scipy.linalg.svdvals(3 * w0.astype(np.float64))
    np.testing.assert_allclose(_values(frame, "sigma_1", "weights")[3], s[0], rtol=1e-6)


def test_values_only_analysis_has_no_subspace_rows(known_store):
    frame = analyze(known_store, k=0, n_values=3, quiet=True)
    metrics = set(frame.metric.astype(str))
    assert "sigma_3" in metrics and "sigma_4" not in metrics
    assert not any(m.endswith(("_prev", "_last")) for m in metrics)


def test_bad_arguments(known_store):
    for kwargs, match in [(dict(k=-1), "k=-1; must be an int >= 0"),
                          (dict(k=2.5), "k=2.5; must be an int"),
                          (dict(targets=["gradients"]), "targets="),
                          (dict(tau=1.5), "tau=1.5"),
                          (dict(device="gpu"), "device must be 'cpu' or 'cuda', got 'gpu'"),
                          (dict(client=object()), "expected a dask.distributed.Client")]:
        with pytest.raises(ValueError, match=match):
            analyze(known_store, quiet=True, **kwargs)
    with pytest.raises(KeyError, match="no recorded matrix 'v'"):
        analyze(known_store, params=["v"], quiet=True)
    with pytest.raises(KeyError, match="run analyze"):
        singular_values(known_store, "w", k=5)


def test_a_single_name_is_one_target_or_one_matrix(tmp_path):
    path = tmp_path / "seq.zarr"
    writer = create_run(path, [MatrixSpec(n, (4, 3), (4, 3), "linear") for n in ("0.weight", "2.weight")],
                        {n: np.eye(4, 3, dtype=np.float32) for n in ("0.weight", "2.weight")})
    writer.append(0, {n: np.eye(4, 3, dtype=np.float32) for n in ("0.weight", "2.weight")})
    frame = analyze(path, targets="updates", params="2.weight", quiet=True)
    assert set(frame.target) == {"updates"} and set(frame.param) == {"2.weight"}


def test_a_store_without_snapshots_gives_an_empty_frame(tmp_path):
    path = tmp_path / "empty.zarr"
    create_run(path, [MatrixSpec("w", (4, 3), (4, 3), "linear")], {"w": np.ones((4, 3), np.float32)})
    frame = analyze(path, quiet=True)
    assert frame.empty and list(frame.columns) == ["step", "param", "target", "metric", "value"]


ODD = {"head": (2, 16), "token": (1, 16), "column": (16, 1), "scalar": (1, 1), "lora_a": (4, 24),
       "big": (20, 12)}


@pytest.fixture
def odd_store(tmp_path):
    """Matrices smaller than the default k in every direction, beside an ordinary one."""
    rng = np.random.default_rng(3)
    path = tmp_path / "odd.zarr"
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in ODD.items()}
    writer = create_run(path, [MatrixSpec(n, s, s, "linear") for n, s in ODD.items()], weights)
    for step in range(4):
        weights = {n: (w + 0.3 * rng.standard_normal(w.shape)).astype(np.float32)
                   for n, w in weights.items()}
        writer.append(step, weights)
    return path


def test_k_is_clamped_per_matrix_and_odd_matrices_never_fail_the_store(odd_store):
    frame = analyze(odd_store, quiet=True)  # default k = 8
    assert frame.attrs["k"] == {"head": 2, "token": 1, "column": 1, "scalar": 1, "lora_a": 4,
                                "big": 8}
    run = spectra.open_run(odd_store)
    for name in ODD:
        for t, step in enumerate(run.steps):
            s = scipy.linalg.svdvals(run.weights(name, t).astype(np.float64))
            got = frame[(frame.param == name) & (frame.target == "weights") & (frame.step == step)]
            got = got.set_index("metric")["value"]
            np.testing.assert_allclose(got["nuclear_norm"], s.sum(), rtol=1e-9)
            assert f"sigma_{len(s) + 1}" not in got
        # with k = min(m, n) the top-k bases are the full bases: both stabilities agree
        if frame.attrs["k"][name] == min(ODD[name]):
            np.testing.assert_allclose(_values(frame, "topk_stability_prev", "weights", name)[1:],
                                       _values(frame, "oialr_stability_prev", "weights", name)[1:],
                                       rtol=0, atol=1e-12)
    one = analyze(odd_store, params=["big"], k=12, quiet=True)  # only "big" is validated
    assert one.attrs["k"] == {"big": 12}


def test_numerical_rank_uses_the_parameters_dtype(tmp_path):
    """A rank-4 matrix rounded to bfloat16: rank 4 at bf16's eps, not 61 at float32's."""
    rng = np.random.default_rng(5)
    def rank_4():
        u, v = (np.linalg.qr(rng.standard_normal((d, 4)))[0] for d in (64, 48))
        return (u * [1.0, 0.9, 0.8, 0.7]) @ v.T

    low_rank = [rank_4() for _ in range(3)]
    bf16 = [torch.tensor(w).to(torch.bfloat16).float().numpy() for w in low_rank]
    path = tmp_path / "bf16.zarr"
    writer = create_run(path, [MatrixSpec("w", (64, 48), (64, 48), "linear", dtype="bfloat16")],
                        {"w": bf16[0]})
    for step, w in enumerate(bf16[1:]):
        writer.append(step, {"w": w})
    frame = analyze(path, k=0, quiet=True)
    np.testing.assert_array_equal(_values(frame, "numerical_rank", "weights"), [4, 4])
    s = scipy.linalg.svdvals(bf16[1].astype(np.float64))
    float32_rank = (s > 64 * np.finfo(np.float32).eps * s[0]).sum()
    assert float32_rank > 40  # what float32's eps would have said: the test can fail
