"""The Recorder: snapshots against weights captured independently, schedules, resume, failures."""

import errno
import threading
import warnings

import numpy as np
import pytest
import torch

import spectra
from conftest import TinyNet, train_steps
from spectra.capture.recorder import Recorder
from spectra.store import RunWriter, StoreError


def _capture(model):
    return {n: p.detach().reshape(p.shape[0], -1).clone().numpy()
            for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("emb")}


def _writer_threads():
    return [t for t in threading.enumerate() if t.name == "spectra-writer"]


def test_snapshots_match_weights_captured_at_the_same_steps(tiny, tmp_path):
    model, opt, gen = tiny
    captured = {0: _capture(model)}
    with Recorder(model, tmp_path / "r.zarr", every=5) as rec:
        def on_step(k, loss):
            if rec.step(loss=loss):
                captured[k] = _capture(model)
        train_steps(model, opt, 17, gen, on_step)
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 5, 10, 15])
    assert sorted(captured) == [0, 5, 10, 15]
    for t, step in enumerate(run.steps):
        for name in run.params:
            np.testing.assert_array_equal(run.weights(name, t), captured[step][name])
    assert np.isnan(run.scalars["loss"][0]) and np.all(np.isfinite(run.scalars["loss"][1:]))
    np.testing.assert_array_equal(run.updates("fc1.weight", 0), 0.0)
    assert not _writer_threads()


def test_log_schedule_and_final_snapshot(tiny, tmp_path):
    model, opt, gen = tiny
    with Recorder(model, tmp_path / "r.zarr", schedule="log") as rec:
        train_steps(model, opt, 14, gen, lambda k, loss: rec.step())
        assert rec.snapshot(note=1.0) is True
        assert rec.snapshot() is False  # already snapshotted this step
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 14])
    np.testing.assert_array_equal(run.weights("fc2.weight", -1), model.fc2.weight.detach().numpy())
    assert run.scalars["note"][-1] == 1.0


def test_optimizer_hook_drives_recording(tiny, tmp_path):
    model, opt, gen = tiny
    with Recorder(model, tmp_path / "r.zarr", every=2, optimizer=opt) as rec:
        def on_step(k, loss):
            rec.log(loss=loss)
        train_steps(model, opt, 6, gen, on_step)
        with pytest.raises(RuntimeError, match="driven by its optimizer"):
            rec.step()
    assert not opt._optimizer_step_post_hooks  # the hook is removed on exit
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    assert run.attrs["optimizer"]["name"] == "SGD" and run.attrs["optimizer"]["lr"] == 0.1
    # the loss logged at step k-1 is attached to the snapshot at step k (logged before opt.step)
    assert np.isfinite(run.scalars["loss"][1:]).all()


def test_resume_continues_the_store(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    with Recorder(model, path, every=2) as rec:
        train_steps(model, opt, 4, gen, lambda k, loss: rec.step())
    init = spectra.open_run(path).init("fc1.weight")
    captured = {}
    with Recorder(model, path, every=2) as rec:  # model is at step 4 = last snapshot
        assert rec.global_step == 4
        def on_step(k, loss):
            if rec.step():
                captured[rec.global_step] = _capture(model)
        train_steps(model, opt, 4, gen, on_step)
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(run.init("fc1.weight"), init)  # W_0 kept
    np.testing.assert_array_equal(run.weights("fc1.weight", -1), captured[8]["fc1.weight"])
    assert [r["step"] for r in run.attrs["resumes"]] == [4]


def test_resume_from_an_older_checkpoint_needs_start_step(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    with Recorder(model, path, every=1) as rec:
        train_steps(model, opt, 3, gen, lambda k, loss: rec.step())
    model.load_state_dict(checkpoint)
    with pytest.raises(StoreError, match=r"differs from the store's last snapshot \(step 3\); pass start_step"):
        Recorder(model, path).start()
    with pytest.raises(StoreError, match="start_step=2 is not after the last committed step 3"):
        Recorder(model, path, start_step=2).start()
    with Recorder(model, path, every=5, start_step=10) as rec:
        train_steps(model, opt, 5, gen, lambda k, loss: rec.step())
    np.testing.assert_array_equal(spectra.open_run(path).steps, [0, 1, 2, 3, 10, 15])


def test_resume_with_a_different_model_names_the_parameter_and_shapes(tiny, tmp_path):
    model, opt, gen = tiny
    with Recorder(model, tmp_path / "r.zarr"):
        pass
    other = TinyNet()
    other.fc2 = torch.nn.Linear(8, 9)
    with pytest.raises(StoreError, match=r"'fc2.weight' has shape \(9, 8\) in the model but \(5, 8\) in the store"):
        Recorder(other, tmp_path / "r.zarr").start()
    with pytest.raises(StoreError, match="the store records 'conv.weight'"):
        Recorder(TinyNet(), tmp_path / "r.zarr", exclude="conv*").start()


def test_path_that_is_not_a_store_is_left_untouched(tiny, tmp_path):
    model, _, _ = tiny
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("data")
    with pytest.raises(StoreError, match="exists and is not a spectra run store"):
        Recorder(model, folder).start()
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert not _writer_threads()


def test_non_finite_weights_are_recorded_with_a_warning(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.warns(RuntimeWarning, match=r"non-finite weights at step 1 in \['fc1.weight'\]"):
        with Recorder(model, tmp_path / "r.zarr") as rec:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")
                model.fc1.weight[1, 1] = float("inf")
            rec.step()
    w = spectra.open_run(tmp_path / "r.zarr").weights("fc1.weight", 1)
    assert np.isnan(w[0, 0]) and np.isinf(w[1, 1]) and np.isfinite(w[2:]).all()


def test_writer_error_is_reraised_and_committed_snapshots_survive(tiny, tmp_path, monkeypatch):
    """A full disk while writing snapshot 3: training sees the error, the store keeps 0..2."""
    model, opt, gen = tiny
    original = RunWriter._write_update

    def fail_at_step_3(self, name, row, w, step):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, row, w, step)

    monkeypatch.setattr(RunWriter, "_write_update", fail_at_step_3)
    with pytest.raises(RuntimeError, match="No space left on device.*keeps its 3 committed"):
        with Recorder(model, tmp_path / "r.zarr") as rec:
            train_steps(model, opt, 8, gen, lambda k, loss: rec.step())
    assert not _writer_threads()
    monkeypatch.undo()
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.steps, [0, 1, 2])
    model2 = TinyNet()
    with Recorder(model2, tmp_path / "r.zarr", start_step=20):  # and it resumes
        pass
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2, 20])


def test_exception_in_the_loop_flushes_and_removes_threads_and_hooks(tiny, tmp_path):
    model, opt, gen = tiny
    with pytest.raises(KeyError, match="boom"):
        with Recorder(model, tmp_path / "r.zarr", optimizer=opt, every=1):
            train_steps(model, opt, 3, gen)
            raise KeyError("boom")
    assert not _writer_threads() and not opt._optimizer_step_post_hooks
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2, 3])


def test_bounded_queue_blocks_training_instead_of_growing(tiny, tmp_path, monkeypatch):
    model, opt, gen = tiny
    gate = threading.Event()
    original = RunWriter.append
    monkeypatch.setattr(RunWriter, "append", lambda self, *a, **k: (gate.wait(), original(self, *a, **k)))
    rec = Recorder(model, tmp_path / "r.zarr", max_pending=2).start()
    done = []
    worker = threading.Thread(target=lambda: [rec.step() for _ in range(6)] and done.append(1))
    worker.start()
    worker.join(timeout=1.0)
    assert worker.is_alive() and rec._background.pending() <= 2  # blocked on the full queue
    gate.set()
    worker.join(timeout=10)
    rec.close()
    assert done and len(spectra.open_run(tmp_path / "r.zarr")) == 7


def test_bad_arguments(tiny, tmp_path):
    model, opt, _ = tiny
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Recorder("model", tmp_path / "r.zarr")
    with pytest.raises(ValueError, match="either every= or schedule="):
        Recorder(model, tmp_path / "r.zarr", every=3, schedule="log")
    with pytest.raises(ValueError, match="start_step=-1"):
        Recorder(model, tmp_path / "r.zarr", start_step=-1)
    with pytest.raises(RuntimeError, match="not started"):
        Recorder(model, tmp_path / "r.zarr").step()
    with pytest.raises(ValueError, match="update_dtype='float16'"):
        Recorder(model, tmp_path / "x.zarr", update_dtype="float16").start()


def test_a_failed_start_leaves_no_thread_hook_or_half_made_store(tiny, tmp_path, monkeypatch):
    model, opt, _ = tiny

    def broken_snapshot(self, scalars, collected=None):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(Recorder, "_snapshot", broken_snapshot)
    for path in (tmp_path / "new.zarr", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        with pytest.raises(RuntimeError, match="disk vanished"):
            Recorder(model, path, optimizer=opt).start()
        assert not _writer_threads() and not opt._optimizer_step_post_hooks
        assert not path.exists() or not any(path.iterdir())  # nothing made, the folder kept
    assert (tmp_path / "empty").is_dir()
    monkeypatch.undo()
    with Recorder(model, tmp_path / "new.zarr"):  # and the path is usable afterwards
        pass
    assert len(spectra.open_run(tmp_path / "new.zarr")) == 1


def test_a_failed_resume_keeps_the_existing_store(tiny, tmp_path):
    model, opt, gen = tiny
    with Recorder(model, tmp_path / "r.zarr") as rec:
        train_steps(model, opt, 2, gen, lambda k, loss: rec.step())
    with pytest.raises(StoreError, match="differs from the store's last snapshot"):
        Recorder(TinyNet(), tmp_path / "r.zarr").start()
    assert not _writer_threads()
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2])
