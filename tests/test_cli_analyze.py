"""`spectra analyze`: bad input is one line and exit code 2; --workers gives the serial frame."""

import numpy as np
import pandas as pd
import pytest

from spectra.cli import main
from spectra.store import MatrixSpec, create_run


def make_store(path, snapshots):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    writer = create_run(path, [MatrixSpec("fc.weight", (12, 8), (12, 8), "linear")], {"fc.weight": w})
    for step in range(snapshots):
        writer.append(step, {"fc.weight": w + step * rng.standard_normal(w.shape).astype(np.float32)})


@pytest.mark.parametrize("snapshots, options, message", [
    (0, [], "has no committed snapshot yet: nothing to analyze"),
    (2, ["--device", "gpu"], "device must be 'cpu' or 'cuda', got 'gpu'"),
    (2, ["--workers", "0"], "--workers 0: must be at least 1"),
])
def test_bad_input_is_one_line(tmp_path, capsys, snapshots, options, message):
    make_store(tmp_path / "run.zarr", snapshots)
    assert main(["analyze", str(tmp_path / "run.zarr"), "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_workers_give_the_serial_frame(tmp_path, capsys):
    make_store(tmp_path / "run.zarr", 6)
    for name, options in (("serial", []), ("dask", ["--workers", "2"])):
        assert main(["analyze", str(tmp_path / "run.zarr"), "--quiet", "--cache",
                     str(tmp_path / f"{name}.cache"), "-o", str(tmp_path / f"{name}.parquet"),
                     *options]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dask.parquet"),
                                  pd.read_parquet(tmp_path / "serial.parquet"),
                                  check_exact=False, rtol=0, atol=1e-12)
