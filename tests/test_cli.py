import subprocess
import sys

import pandas
import pytest

import spectra
from spectra.cli import main


@pytest.mark.slow
def test_demo_quick_records_analyzes_and_plots(tmp_path, capsys):
    figures = tmp_path / "figures"
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path), "--figures", str(figures)]) == 0
    assert sorted(p.name for p in figures.iterdir()) == [
        f"demo-{run}-{kind}.png" for run in ("gpt", "mlp")
        for kind in ("ranks", "singular-values", "stability")]
    gpt = spectra.open_run(tmp_path / "demo-gpt.zarr")
    mlp = spectra.open_run(tmp_path / "demo-mlp.zarr")
    assert gpt.steps[0] == 0 and gpt.steps[-1] == 60 and len(gpt.params) == 17
    assert mlp.params == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "demo-mlp.zarr")]) == 0
    out = capsys.readouterr().out
    assert "layers.0.weight" in out and "512 x 784" in out and f"{len(mlp)} snapshots" in out


def test_info_on_a_bad_path_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spectra.cli", "info", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no such run store" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_analyze_writes_the_frame_and_plot_compares_runs(tmp_path, capsys):
    from spectra.tasks.runs import mlp_run
    from spectra.tasks.loops import ClassifierTraining
    for seed in (0, 1):
        mlp_run("full", tmp_path / f"s{seed}.zarr", quiet=True,
                training=ClassifierTraining(epochs=1, seed=seed), every=20)
    assert main(["analyze", str(tmp_path / "s0.zarr"), "-o", str(tmp_path / "f.csv"), "--quiet"]) == 0
    out = capsys.readouterr().out
    frame = pandas.read_csv(tmp_path / "f.csv")
    assert list(frame.columns) == ["step", "param", "target", "metric", "value"]
    assert "layers.0.weight" in out and "erank ΔW" in out
    assert main(["plot", str(tmp_path / "s0.zarr"), str(tmp_path / "s1.zarr"), "-o",
                 str(tmp_path / "fig"), "--k", "0", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert "compare-effective_rank-updates.png" in names and "s1-ranks.png" in names
    assert main(["analyze", str(tmp_path / "s0.zarr"), "-o", str(tmp_path / "f.txt")]) == 2
