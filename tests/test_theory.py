"""Theory checks on deep linear networks (spectra.methods.theory): the toy setting, the closed forms,
and small versions of C1–C6 that pass where theory says they hold and fail where it says they
break (large init scale α, Adam's timing)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import special

import spectra
from spectra.cli import main
from spectra.methods.theory import checks
from spectra.methods.theory.closed_forms import (crossing_time, mode_trajectory, plateau_losses,
                                         saxe_depth2)
from spectra.methods.theory.linear_nets import (DeepLinearNet, init_orthogonal, make_teacher,
                                        whitened_inputs)
from spectra.methods.theory.measure import first_crossing, load
from spectra.methods.theory.training import Setting, train

# Small and fast: a rank-3 teacher in 4 dimensions, τ = 1/0.02 = 50 steps.
SMALL = Setting(depth=3, alpha=0.1, teacher=(4.0, 2.0, 1.0), dim=4, width=16, lr=0.02,
                snapshots=40)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Measured runs of SMALL at α = 0.1, 0.2, 0.5, 1 (gd), with Adam, and depth 2 aligned."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("theory")
    settings = {"a0.1": SMALL, "a0.2": replace(SMALL, alpha=0.2),
                "a0.5": replace(SMALL, alpha=0.5), "a1": replace(SMALL, alpha=1.0),
                "adam": replace(SMALL, optimizer="adam", lr=0.005),
                "aligned2": replace(SMALL, depth=2, init="aligned", lr=0.005)}
    measured = {}
    for key, setting in settings.items():
        train(setting, folder / f"{key}.zarr", quiet=True)
        measured[key] = load(folder / f"{key}.zarr", layers=key in ("a0.1", "a1"))
    return measured


# -- the toy setting ---------------------------------------------------------------------------

def test_whitened_inputs_make_the_mean_squared_loss_half_the_squared_frobenius_distance():
    generator = torch.Generator().manual_seed(1)
    x = whitened_inputs(64, 5, generator)
    teacher = make_teacher([3.0, 1.0], 5, generator)
    w = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    t = torch.from_numpy(teacher.matrix)
    mse = 0.5 * (x @ w.T - x @ t.T).pow(2).sum(dim=1).mean()
    assert torch.allclose(x.T @ x / 64, torch.eye(5, dtype=torch.float64), atol=1e-13)
    assert mse.item() == pytest.approx(0.5 * (w - t).pow(2).sum().item(), rel=1e-12)
    assert np.allclose(np.linalg.svd(teacher.matrix, compute_uv=False), [3, 1, 0, 0, 0],
                       atol=1e-12)


def test_init_is_alpha_times_orthogonal_and_the_aligned_one_starts_every_mode_at_alpha_to_the_d():
    generator = torch.Generator().manual_seed(2)
    teacher = make_teacher([4.0, 2.0, 1.0], 4, generator)
    net = DeepLinearNet(dim=4, width=6, depth=3)
    init_orthogonal(net, 0.3, generator)
    for layer in net.layers:
        assert np.allclose(torch.linalg.svdvals(layer.weight).detach(), 0.3, atol=1e-13)
    init_orthogonal(net, 0.3, generator, aligned_to=teacher)
    product = net.product.weight.detach().numpy()
    assert np.allclose(teacher.u.T @ product @ teacher.v, 0.3**3 * np.eye(4), atol=1e-14)


def test_the_recorder_keeps_every_layer_and_the_end_to_end_product(tmp_path):
    path = train(replace(SMALL, steps=30, snapshots=5), tmp_path / "r.zarr", quiet=True)
    run = spectra.open_run(path)
    assert run.params == ["layers.0.weight", "layers.1.weight", "layers.2.weight",
                          "product.weight"]  # model order: the layers are registered first
    assert run.spec("product.weight").kind == "effective"
    assert run.shape("layers.1.weight") == (16, 16) and run.steps[-1] == 30
    w1, w2, w3 = (run.weights(f"layers.{i}.weight", -1) for i in range(3))
    assert np.allclose(run.weights("product.weight", -1), w3 @ w2 @ w1, rtol=0, atol=1e-14)


def test_first_crossing_interpolates_between_snapshots():
    steps = np.array([0, 10, 20, 40])
    values = np.array([0.0, 1.0, 3.0, 5.0])
    assert first_crossing(steps, values, 2.0) == 15.0
    assert first_crossing(steps, values, 0.0) == 0.0
    assert math.isnan(first_crossing(steps, values, 6.0))


# -- closed forms ------------------------------------------------------------------------------

def test_the_reduced_flow_from_an_aligned_start_is_the_saxe_solution():
    t = np.linspace(0, 400, 81)
    flow = mode_trajectory(t, 4.0, 0.01, 0.1, 2, 200.0)
    assert np.allclose(flow, saxe_depth2(t, 4.0, 0.01, 200.0), rtol=1e-6, atol=1e-9)
    # Saxe: m = s/2 at e^{2st/τ} = s/u0 − 1
    assert crossing_time(0.5, 4.0, 0.01, 0.1, 2, 200.0) == pytest.approx(
        200.0 / 8.0 * math.log(4.0 / 0.01 - 1), rel=1e-7)


def test_depth3_escape_time_approaches_c_tau_over_s_alpha_with_the_beta_function_constant():
    # α → 0 with m_0 = 0: t50·s·α/τ → (1/3)∫_0^∞ (1 + x²)^(-2/3) dx = B(1/2, 1/6)/6
    constant = special.beta(0.5, 1 / 6) / 6
    assert constant == pytest.approx(1.214, abs=1e-3)
    alpha = 1e-3
    t50 = crossing_time(0.5, 1.0, 0.0, alpha, 3, 1.0)
    assert t50 * alpha == pytest.approx(constant, rel=0.01)
    # the aligned start (m_0 = α^3) gives C = 1 instead
    assert crossing_time(0.5, 1.0, alpha**3, alpha, 3, 1.0) * alpha == pytest.approx(1.0, rel=0.01)


def test_plateau_losses_are_half_the_unlearned_energy():
    assert np.allclose(plateau_losses([8, 4, 2, 1]), [10.5, 2.5, 0.5])


def test_saxe_closed_form_matches_simulated_aligned_depth2_descent_within_5_percent(runs):
    run = runs["aligned2"]
    for i, s in enumerate(run.s):
        closed = saxe_depth2(run.steps, s, run.setting.alpha**2, run.setting.tau)
        assert np.max(np.abs(run.modes[:, i] - closed)) <= 0.05 * s
    assert np.allclose(run.crossing(0.5) / run.predicted_crossing(0.5), 1, atol=0.05)


# -- C1-C6 pass at small α and fail where theory says they must not hold -----------------------

def test_c1_modes_are_learned_in_order_with_gd_and_adam(runs):
    assert checks.order(runs["a0.1"]).passed
    assert checks.order(runs["adam"]).passed


def test_c1_fails_when_a_weaker_mode_is_learned_first(runs):
    run = runs["a0.1"]
    swapped = run.modes.copy()
    swapped[:, [0, 1]] = run.modes[:, [1, 0]] * (run.s[[0, 1]] / run.s[[1, 0]])
    assert not checks.order(replace(run, modes=swapped)).passed


def test_c2_gd_timing_matches_the_closed_form_but_adam_and_a_wrong_tau_do_not(runs):
    result = checks.timing(runs["a0.1"])
    assert result.passed
    assert np.allclose(result.values["ratio"], 1, atol=0.03)
    assert not checks.timing(runs["adam"]).passed  # Adam has no 1/s timing law
    doubled = replace(runs["a0.1"], setting=replace(SMALL, lr=0.04))  # τ halved
    assert not checks.timing(doubled).passed


def test_c2_slope_in_alpha_follows_the_reduced_flow_and_is_near_minus_one_at_small_alpha(runs):
    result = checks.timing_slope([runs["a0.1"], runs["a0.2"]])
    assert result.passed
    assert np.all(np.abs(np.array(result.values["measured"]) + 1) < 0.15)


def test_c3_staircase_holds_at_small_alpha_and_breaks_at_alpha_one(runs):
    small = checks.staircase(runs["a0.1"])
    assert small.passed
    assert np.allclose(small.values["plateaus"], [2.5, 0.5], rtol=0.05)
    assert not checks.staircase(runs["a1"]).passed


def test_c4_update_subspaces_align_with_the_teacher_at_small_alpha_only(runs):
    assert checks.alignment(runs["a0.1"]).passed
    assert not checks.alignment(runs["a1"]).passed
    growth = checks.alignment_growth([runs[k] for k in ("a0.1", "a0.2", "a0.5", "a1")])
    assert growth.passed and growth.values["rho"] > 0.9


def test_c5_updates_have_lower_effective_rank_than_weights_until_the_init_is_as_large_as_t(runs):
    assert checks.updates_vs_weights(runs["a0.1"]).passed
    lazy = checks.updates_vs_weights(runs["a1"])
    assert not lazy.passed and lazy.values["max_excess"]["product.weight"] > 0.1
    assert max(v for k, v in lazy.values["max_excess"].items() if k != "product.weight") < 0


def test_c6_separation_falls_with_alpha_as_predicted_and_a_lazy_only_sweep_fails(runs):
    sweep = [runs[k] for k in ("a0.1", "a0.2", "a0.5", "a1")]
    result = checks.init_sweep(sweep)
    assert result.passed
    assert result.values["measured"][0] > 1.3 and result.values["measured"][-1] < 0.1
    assert not checks.init_sweep(sweep[2:]).passed  # never separated: not incremental


# -- the command -------------------------------------------------------------------------------

@pytest.mark.slow
def test_theory_command_prints_the_table_and_writes_figures(tmp_path, capsys):
    code = main(["theory", "--teacher", "4,2", "--width", "8", "--alpha", "0.2",
                 "--alphas", "0.2,1", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| C3 staircase | D=3 α=1 gd |" in out and "outcomes are the ones theory predicts" in out
    for name in ("theory-checks.csv", "theory-modes-d3.png", "theory-modes-d2.png",
                 "theory-sweep.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_theory_command_rejects_a_bad_teacher(capsys):
    assert main(["theory", "--teacher", "8,four"]) == 2
    assert "--teacher '8,four'" in capsys.readouterr().err
