"""Figures draw the frame's numbers: checked on the artists, not just on the files."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from spectra import plot


def _frame():
    """Two matrices, two targets, steps 0..4, with known metric values."""
    rows = []
    for p_index, param in enumerate(["a.weight", "b.weight"]):
        for step in range(5):
            for target, base in (("updates", 1.0), ("weights", 10.0)):
                rows.append((step, param, target, "effective_rank", base + step + p_index))
                rows.append((step, param, target, "oialr_stability_prev", 1 - 10.0 ** -(step + 1)))
                for i in (1, 2):
                    rows.append((step, param, target, f"sigma_{i}", (step + 1) / i))
    frame = pd.DataFrame(rows, columns=["step", "param", "target", "metric", "value"])
    frame["param"] = pd.Categorical(frame["param"], categories=["b.weight", "a.weight"])
    return frame


def test_rank_curves_draw_updates_and_weights_per_matrix_in_model_order():
    fig = plot.rank_curves(_frame())
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["b", "a"]  # category (model) order
    lines = {line.get_label(): line for line in axes[1].get_lines()}
    np.testing.assert_array_equal(lines["weights"].get_ydata(), [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(lines["updates"].get_xdata(), [1, 2, 3, 4])  # ΔW_0 not drawn
    plt.close(fig)


def test_stability_heatmap_shows_distance_from_one():
    fig = plot.stability_heatmap(_frame())
    mesh = fig.axes[0].collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(2, 5)[0], 10.0 ** -np.arange(1, 6))
    plt.close(fig)


def test_singular_values_and_comparison():
    fig = plot.singular_values(_frame(), params=["a.weight"])
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["σ2"], np.arange(1, 6) / 2)
    plt.close(fig)
    other = _frame().assign(value=lambda f: f["value"] * 2)
    fig = plot.compare_runs({"one": _frame(), "two": other}, target="weights")
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    np.testing.assert_array_equal(lines["two"], 2 * lines["one"])
    plt.close(fig)
    renamed = _frame().assign(param=lambda f: f["param"].astype(str) + "x")
    with pytest.raises(ValueError, match="share no matrix"):
        plot.compare_runs({"one": _frame(), "two": renamed})


def test_missing_metric_is_a_clear_error_and_run_figures_are_small(tmp_path):
    with pytest.raises(ValueError, match="no rows for metric='stable_rank'"):
        plot.rank_curves(_frame(), metric="stable_rank")
    paths = plot.run_figures(_frame(), tmp_path, "run")
    assert [p.name for p in paths] == ["run-ranks.png", "run-singular-values.png", "run-stability.png"]
    assert all(0 < p.stat().st_size < 300_000 for p in paths)
