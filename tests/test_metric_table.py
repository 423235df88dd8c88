"""The metric table is the one list of metrics: analyze's frame, plot's labels and the README's
table all come from it."""

from pathlib import Path

import numpy as np
import pytest

from spectra import plot
from spectra.core import metric_table, metrics
from spectra.core.metric_table import METRICS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_table_is_generated_from_the_metric_table():
    assert metric_table.readme_block(README.read_text()) == metric_table.markdown(), (
        "README's metric table is stale: python -m spectra.core.metric_table README.md")


def test_plot_labels_every_metric_from_the_table():
    names = [name for metric in METRICS for name in metric.names()]
    assert list(plot.LABELS) == names and len(set(names)) == len(names)
    assert plot.LABELS["oialr_stability_prev"] == "OIALR stability vs previous"
    assert plot.LABELS["sigma_2"] == "σ_2"


def test_analyze_reports_exactly_the_table_in_its_order(tmp_path):
    from spectra.analysis.analyzer import analyze
    from spectra.store import MatrixSpec, create_run
    rng = np.random.default_rng(0)
    writer = create_run(tmp_path / "s.zarr", [MatrixSpec("w", (12, 10), (12, 10), "linear")],
                        {"w": rng.standard_normal((12, 10)).astype(np.float32)})
    for step in range(3):
        writer.append(step, {"w": rng.standard_normal((12, 10)).astype(np.float32)})
    frame = analyze(tmp_path / "s.zarr", k=3, n_values=4, quiet=True)
    expected = [name for metric in METRICS for name in metric.names(4)]
    assert list(frame["metric"].cat.categories) == expected
    values_only = analyze(tmp_path / "s.zarr", k=0, n_values=4, quiet=True)
    assert list(values_only["metric"].cat.categories) == [
        name for metric in METRICS if metric.reads == "values" for name in metric.names(4)]


def test_singular_value():
    s = np.array([[3.0, 2.0, 1.0], [np.nan, 1.0, 0.0]])
    np.testing.assert_array_equal(metrics.singular_value(s, 2), [2.0, 1.0])
    with pytest.raises(ValueError, match=r"i=4; must be an int in \[1, 3\]"):
        metrics.singular_value(s, 4)


def test_rewriting_touches_only_the_marked_block():
    """A stale one-letter block must not be replaced wherever that letter occurs elsewhere."""
    text = "arXiv before\n<!-- metric-table -->\nX\n<!-- /metric-table -->\narXiv after\n"
    rewritten = metric_table.rewrite(text)
    assert rewritten.startswith("arXiv before\n") and rewritten.endswith("\narXiv after\n")
    assert metric_table.readme_block(rewritten) == metric_table.markdown()
