"""Several analyze() processes on one store, finished or still being written: no errors, and
every frame equals one clean analysis."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from concurrency_child import SHAPES, snapshot
from spectra.analysis.analyzer import analyze
from spectra.store import MatrixSpec, create_run

HERE = Path(__file__).parent
SNAPSHOTS = 16
pytestmark = pytest.mark.slow


def child(*args):
    return subprocess.Popen([sys.executable, str(HERE / "concurrency_child.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def new_store(path, snapshots=0):
    writer = create_run(path, [MatrixSpec(n, s, s, "linear") for n, s in SHAPES.items()],
                        snapshot(-1))
    for step in range(snapshots):
        writer.append(step, snapshot(step))


def without_last(frame):
    return frame[~frame["metric"].astype(str).str.endswith("_last")].reset_index(drop=True)


@pytest.mark.parametrize("live", [False, True], ids=["finished", "live"])
@pytest.mark.parametrize("analyzers", [2, 3])
def test_concurrent_analyzers_agree_with_one_clean_analysis(tmp_path, analyzers, live):
    store, done = tmp_path / "run.zarr", tmp_path / "done"
    new_store(store, 0 if live else SNAPSHOTS)
    if not live:
        done.touch()
    procs = [child("analyze", store, tmp_path / f"frame{i}", done) for i in range(analyzers)]
    if live:
        procs.append(child("write", store, SNAPSHOTS, done))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    shutil.copytree(store, tmp_path / "clean.zarr", ignore=shutil.ignore_patterns("analysis"))
    clean = analyze(tmp_path / "clean.zarr", k=4, quiet=True, max_bytes=60_000)
    assert clean["step"].nunique() == SNAPSHOTS
    for i in range(analyzers):
        final = pd.read_pickle(tmp_path / f"frame{i}.final.pkl")
        pd.testing.assert_frame_equal(final, clean, check_exact=False, rtol=0, atol=1e-12)
        during = without_last(pd.read_pickle(tmp_path / f"frame{i}.during.pkl"))
        seen = without_last(clean[clean["step"].isin(during["step"].unique())])
        np.testing.assert_allclose(during["value"], seen["value"], rtol=0, atol=1e-12)
