"""Damage on disk: every damaged or missing chunk is a named error (never other numbers or a
NaN row), verify finds each one, repair cuts back only when asked, and resuming never deletes
data because of damage. And a store deleted or replaced under a running writer."""

import shutil
import time

import numpy as np
import pytest
import torch

import spectra
from conftest import train_steps
from spectra.capture.recorder import Recorder, RecordingError
from spectra.store import (MatrixSpec, StoreDamaged, StoreVanished, create_run, repair_run,
                           resume_run, verify_run)

STEPS = [0, 10, 20, 30, 40, 50]


@pytest.fixture
def store(tmp_path):
    """Two matrices, six snapshots at steps 0..50, a loss scalar; closed."""
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((6, 5)).astype(np.float32),
            "v": rng.standard_normal((3, 4)).astype(np.float32)}
    path = tmp_path / "r.zarr"
    writer = create_run(path, [MatrixSpec(n, w.shape, w.shape, "linear") for n, w in init.items()],
                        init)
    truth = []
    for t, step in enumerate(STEPS):
        weights = {n: (w + 0.1 * t * rng.standard_normal(w.shape)).astype(np.float32)
                   for n, w in init.items()}
        writer.append(step, weights, {"loss": 1.0 / (t + 1)})
        truth.append(weights)
    writer.close()
    return path, truth


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path).parts[0] != "locks"}


def test_a_flipped_byte_in_a_matrix_chunk_names_array_snapshot_and_step(store):
    path, truth = store
    _flip(path / "params/w/updates/c.3.0.0")
    run = spectra.open_run(path)
    with pytest.raises(StoreDamaged, match=r"params/w/updates, snapshot 3 \(step 30\): damaged "
                       r"chunk \(checksum mismatch\)") as caught:
        run.weights("w")
    assert (caught.value.array, caught.value.snapshot, caught.value.step) == ("params/w/updates", 3, 30)
    for t in (0, 1, 2, 4, 5):  # everything else reads back intact
        np.testing.assert_array_equal(run.weights("w", t), truth[t]["w"])
    np.testing.assert_array_equal(run.weights("v", 3), truth[3]["v"])
    report = verify_run(path)
    assert [(p.array, p.snapshot, p.reason) for p in report.problems] == [
        ("params/w/updates", 3, "damaged")]
    assert report.intact == 3 and report.repairable


def test_a_deleted_matrix_chunk_is_an_error_not_a_nan_row(store):
    path, _ = store
    (path / "params/v/updates/c.4.0.0").unlink()
    with pytest.raises(StoreDamaged, match=r"params/v/updates, snapshot 4 \(step 40\): chunk "
                       r"missing"):
        spectra.open_run(path).updates("v", slice(2, 6))
    assert [(p.array, p.snapshot, p.reason) for p in verify_run(path).problems] == [
        ("params/v/updates", 4, "missing")]


def test_a_deleted_steps_chunk_is_an_error_and_resuming_deletes_nothing(store):
    path, truth = store
    (path / "steps/c/0").unlink()
    with pytest.raises(StoreDamaged, match=r"steps, snapshot 0 \(step .*\)?: chunk missing|"
                       r"steps, snapshots 0..1023: chunk missing"):
        spectra.open_run(path)
    before = _files(path)
    with pytest.raises(StoreDamaged):
        resume_run(path)
    with pytest.raises(StoreDamaged):
        Recorder(torch.nn.Linear(5, 6), path).start()
    assert _files(path) == before  # nothing cut, nothing written
    report = verify_run(path)
    assert [(p.array, p.reason) for p in report.problems] == [("steps", "missing")]


def test_a_flipped_byte_in_steps_or_a_scalar_or_time(store):
    path, _ = store
    _flip(path / "scalars/loss/c/0")
    run = spectra.open_run(path)
    with pytest.raises(StoreDamaged, match=r"scalars/loss, snapshots 0..1023: damaged chunk"):
        run.scalars
    _flip(path / "time/c/0")
    with pytest.raises(StoreDamaged, match=r"time, snapshots 0..1023: damaged chunk"):
        run.refresh()
    _flip(path / "steps/c/0")
    with pytest.raises(StoreDamaged, match=r"steps, snapshots 0..1023: damaged chunk"):
        spectra.open_run(path)
    assert {p.array for p in verify_run(path).problems} == {"steps"}  # the rest needs steps


def test_a_damaged_w0_cannot_be_repaired_by_cutting(store):
    path, _ = store
    _flip(path / "params/v/init/c/0/0")
    with pytest.raises(StoreDamaged, match=r"params/v/init: damaged chunk"):
        spectra.open_run(path).init("v")
    report = verify_run(path)
    assert not report.repairable and "cannot be repaired" in report.lines()[-1]
    with pytest.raises(spectra.store.StoreError, match="cannot be repaired"):
        repair_run(path, cut=True)


def test_repair_cuts_back_only_when_asked_and_the_store_then_continues(store):
    path, truth = store
    (path / "params/w/updates/c.2.0.0").unlink()
    before = _files(path)
    report = repair_run(path)
    assert not report.ok and report.intact == 2 and _files(path) == before  # a dry run
    repair_run(path, cut=True)
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 10])
    assert run.attrs["repairs"][0]["to_snapshots"] == 2
    assert verify_run(path).ok
    writer = resume_run(path)
    writer.append(20, truth[2])
    writer.close()
    np.testing.assert_array_equal(spectra.open_run(path).weights("w", 2), truth[2]["w"])


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_writer_notices_its_store_deleted_or_replaced(tiny, tmp_path, how):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    rec = Recorder(model, path, every=1).start()
    train_steps(model, opt, 3, gen, lambda k, loss: rec.step())
    deadline = time.monotonic() + 30
    while len(spectra.open_run(path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the writer has committed snapshots 0..2
    shutil.rmtree(path)
    if how == "replaced":
        other = create_run(path, [MatrixSpec("x", (2, 2), (2, 2), "linear")],
                           {"x": np.zeros((2, 2), np.float32)})
        other.close()
        replaced = _files(path)
    with pytest.raises(RecordingError, match="the store was deleted, moved or replaced while "
                       "being written") as caught:
        train_steps(model, opt, 3, gen, lambda k, loss: rec.step())
        rec.close()
    assert isinstance(caught.value.__cause__, StoreVanished)
    rec.close(raise_errors=False)
    if how == "replaced":
        assert _files(path) == replaced  # the new store is untouched
    else:
        assert not path.exists() or not (path / "zarr.json").exists()  # no skeleton of a store


def test_repairing_a_damaged_steps_chunk_leaves_a_store_that_continues(store):
    path, truth = store
    _flip(path / "steps/c/0")
    report = repair_run(path, cut=True)
    assert report.intact == 0 and [p.array for p in report.problems] == ["steps"]
    assert len(spectra.open_run(path)) == 0 and verify_run(path).ok
    writer = resume_run(path)  # W_0 survived: recording starts again from it
    writer.append(0, truth[0])
    writer.close()
    np.testing.assert_array_equal(spectra.open_run(path).weights("w", 0), truth[0]["w"])
