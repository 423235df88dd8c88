import subprocess
import sys

import pytest

import spectra
from spectra.cli import main


@pytest.mark.slow
def test_demo_quick_records_two_stores_and_info_describes_them(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
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
