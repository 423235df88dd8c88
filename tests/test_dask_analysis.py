"""analyze(client=...) on a local dask cluster gives the serial frame, also when a worker dies."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from spectra.analysis.analyzer import analyze
from spectra.store import MatrixSpec, create_run

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

SHAPES = {"a": (40, 30), "b": (24, 56), "c": (48, 48), "head": (2, 48)}


def make_store(path, snapshots, seed=0):
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    writer = create_run(path, [MatrixSpec(n, s, s, "linear") for n, s in SHAPES.items()], weights)
    for step in range(snapshots):
        weights = {n: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32)
                   for n, w in weights.items()}
        writer.append(10 * step, weights)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def assert_same_frame(got, expected):
    """Same rows in the same order; values to 1e-12 (NaN where NaN)."""
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache", [None, "memory"], ids=["cache-in-store", "cache-in-memory"])
def test_client_frames_equal_serial_frames(tmp_path, client, cache):
    make_store(tmp_path / "serial.zarr", 9)
    shutil.copytree(tmp_path / "serial.zarr", tmp_path / "dask.zarr")
    options = dict(k=4, quiet=True, max_bytes=40_000)  # a few snapshots per task
    serial = analyze(tmp_path / "serial.zarr", **options)
    on_cluster = analyze(tmp_path / "dask.zarr", client=client, cache=cache, **options)
    assert_same_frame(on_cluster, serial)
    assert on_cluster.attrs["k"] == serial.attrs["k"] == {"a": 4, "b": 4, "c": 4, "head": 2}
    if cache is None:  # the workers filled the store's cache: a second call computes nothing
        again = analyze(tmp_path / "dask.zarr", **options)
        assert_same_frame(again, serial)


def test_a_killed_worker_leaves_a_cache_that_a_rerun_completes(tmp_path, client):
    make_store(tmp_path / "clean.zarr", 24)
    shutil.copytree(tmp_path / "clean.zarr", tmp_path / "killed.zarr")
    options = dict(k=4, quiet=True, max_bytes=20_000)  # one snapshot per task: many tasks
    clean = analyze(tmp_path / "clean.zarr", **options)
    outcome = {}

    def run():
        try:
            outcome["frame"] = analyze(tmp_path / "killed.zarr", client=client, **options)
        except Exception as exc:  # noqa: BLE001 (whatever dask raises for the dead worker)
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    entry = tmp_path / "killed.zarr" / "analysis" / "k4" / "weights" / "c" / "zarr.json"
    deadline = time.monotonic() + 120
    while not entry.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    killed_mid_run = worker.is_alive()
    worker.join(timeout=600)
    assert killed_mid_run and not worker.is_alive()
    rerun = analyze(tmp_path / "killed.zarr", **options)
    assert_same_frame(rerun, clean)
