"""Figures draw the frame's numbers: checked on the artists, not just on the files."""

import os
import subprocess
import sys

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
    # "vs previous": the first snapshot has no previous one, so steps 1..4 are drawn
    np.testing.assert_allclose(np.asarray(mesh.get_array())[0], 10.0 ** -np.arange(2, 6))
    plt.close(fig)


def _uneven_frame(steps=(0, 10, 100, 250, 251, 400, 500, 501), forced=(251, 501)):
    """The demo's kind of schedule: log-spaced snapshots plus ``forced`` ones a step after
    another, where the basis has barely moved (1 − s = 1e-7)."""
    rows = [(step, param, "weights", "oialr_stability_prev",
             np.nan if i == 0 else 1 - (1e-7 if step in forced else 1e-3 * (i + p)))
            for p, param in enumerate(["a.weight", "b.weight"]) for i, step in enumerate(steps)]
    return pd.DataFrame(rows, columns=["step", "param", "target", "metric", "value"])


def test_stability_heatmap_cells_span_the_steps_since_the_previous_snapshot():
    steps = (0, 10, 100, 250, 400, 500)
    fig = plot.stability_heatmap(_uneven_frame(steps))
    ax = fig.axes[0]
    mesh = ax.collections[0]
    np.testing.assert_array_equal(mesh.get_coordinates()[0, :, 0], steps)  # (rows+1, cols+1, 2)
    np.testing.assert_allclose(np.asarray(mesh.get_array())[0], 1e-3 * np.arange(1, 6))
    left, right = ax.transData.transform([(10, 0), (100, 0)])[:, 0]
    assert (right - left) / ax.get_window_extent().width > 0.2  # widths drawn as steps, log axis
    assert "previous snapshot" in ax.get_xlabel()
    plt.close(fig)


def test_forced_snapshots_a_step_apart_draw_no_hairline_and_do_not_stretch_the_colours():
    """Steps 250→251 and 500→501 (forced snapshots, 1 − s = 1e-7) join the cell before them."""
    fig = plot.stability_heatmap(_uneven_frame())
    mesh = fig.axes[0].collections[0]
    np.testing.assert_array_equal(mesh.get_coordinates()[0, :, 0], [0, 10, 100, 251, 400, 501])
    np.testing.assert_allclose(np.asarray(mesh.get_array())[0], 1e-3 * np.array([1, 2, 3, 5, 6]))
    assert (mesh.norm.vmin, mesh.norm.vmax) == pytest.approx((1e-3, 7e-3))
    plt.close(fig)
    leading = plot.stability_heatmap(_uneven_frame(steps=(0, 1, 100, 200), forced=(1,)))
    np.testing.assert_array_equal(leading.axes[0].collections[0].get_coordinates()[0, :, 0],
                                  [0, 100, 200])
    plt.close(leading)


def test_stability_heatmap_of_a_single_snapshot_is_a_clear_error(tmp_path):
    one = _uneven_frame((0,))
    with pytest.raises(ValueError, match="at least two snapshots"):
        plot.stability_heatmap(one)
    ranks = one.assign(metric="effective_rank", value=3.0)
    sigma = one.assign(metric="sigma_1", value=2.0, target="updates")
    paths = plot.run_figures(pd.concat([one, ranks, ranks.assign(target="updates"), sigma]),
                             tmp_path, "one")
    assert [p.name for p in paths] == ["one-ranks.png", "one-singular-values.png"]


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
    fig = plot.compare_runs({"one": _frame(), "two": other}, target="updates")
    for line in fig.axes[0].get_lines():  # ΔW_0 = 0 is not drawn, as in rank_curves
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4])
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


def test_run_labels_tell_stores_with_the_same_name_apart(tmp_path):
    assert plot.run_labels(["x/one.zarr", "y/two.zarr"]) == ["one", "two"]
    assert plot.run_labels(["a/run.zarr", "b/run.zarr"]) == ["a-run", "b-run"]
    assert plot.run_labels(["p/a/run.zarr", "q/a/run.zarr", "q/b/run.zarr"]) == [
        "p-a-run", "q-a-run", "q-b-run"]
    with pytest.raises(ValueError, match="more than once"):
        plot.run_labels([tmp_path / "run.zarr", tmp_path / "." / "run.zarr"])


def test_spectra_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    """Importing and using spectra.plot keeps the backend the user chose (plt.show() works)."""
    script = f"""
import matplotlib
matplotlib.use("svg")
import pandas as pd
from spectra import plot
frame = pd.read_pickle({str(tmp_path / "frame.pkl")!r})
plot.run_figures(frame, {str(tmp_path)!r}, "run")
plot.save(plot.compare_runs({{"a": frame, "b": frame}}), {str(tmp_path / "compare.png")!r})
print(matplotlib.get_backend())
"""
    _frame().to_pickle(tmp_path / "frame.pkl")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "MPLBACKEND": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg"]
    assert (tmp_path / "run-stability.png").stat().st_size > 0
