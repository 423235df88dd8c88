"""The Recorder: snapshots against weights captured independently, schedules, resume, failures."""

import errno
import os
import threading
import warnings

import numpy as np
import pytest
import torch

import spectra
from conftest import TinyNet, tiny_batch, train_steps
from spectra.capture.recorder import Recorder, RecordingError
from spectra.store import RunWriter, StoreError, StoreLocked


def _capture(model):
    return {n: p.detach().reshape(p.shape[0], -1).clone().numpy()
            for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("emb")}


def _files(path):
    """Every file under ``path`` with its bytes, but the lock's record of its last holder: to
    check that nothing changed."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path).parts[0] != "locks"}


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


def test_resume_from_an_older_checkpoint_needs_start_step_and_rewind(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    with Recorder(model, path, every=1) as rec:
        def on_step(k, loss):
            rec.step()
            if k == 2:
                checkpoint.update({n: v.clone() for n, v in model.state_dict().items()})
        checkpoint = {}
        train_steps(model, opt, 4, gen, on_step)
    before = _files(path)
    model.load_state_dict(checkpoint)  # the model is back at step 2
    with pytest.raises(StoreError, match=r"your checkpoint is older than the store: the model is "
                       r"the snapshot at step 2, but the store goes on to step 4; pass "
                       r"start_step=2, rewind=True .*drops 2 snapshot"):
        Recorder(model, path).start()
    with pytest.raises(StoreError, match=r"start_step=2 is not after the last committed step 4: "
                       r".*pass rewind=True \(drops 2 snapshot\(s\): steps 3..4\)"):
        Recorder(model, path, start_step=2).start()
    assert _files(path) == before  # refusals change nothing
    captured = {}
    with Recorder(model, path, start_step=2, rewind=True) as rec:
        assert rec.global_step == 2
        def again(k, loss):
            rec.step()
            captured[rec.global_step] = _capture(model)
        train_steps(model, opt, 3, gen, again)
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 3, 4, 5])
    for t in (3, 4, 5):  # the new timeline's weights, not the old ones
        np.testing.assert_array_equal(run.weights("fc1.weight", t), captured[t]["fc1.weight"])
    assert run.attrs["rewinds"][0]["to_step"] == 2 and run.attrs["rewinds"][0]["dropped"] == 2


def test_resume_checks_every_matrix_not_just_the_first(tiny, tmp_path):
    """A stale checkpoint whose first matrix is frozen (so equal to the last snapshot's;
    recorded with trainable_only=False)."""
    model, opt, gen = tiny
    model.conv.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stale = {}
    with Recorder(model, tmp_path / "r.zarr", every=2, trainable_only=False) as rec:
        def on_step(k, loss):
            rec.step()
            if k == 1:
                stale.update({n: v.clone() for n, v in model.state_dict().items()})
        train_steps(model, opt, 4, gen, on_step)
    model.load_state_dict(stale)  # step 1: not a snapshot; conv.weight is still equal
    assert spectra.open_run(tmp_path / "r.zarr").params[0] == "conv.weight"
    with pytest.raises(StoreError, match=r"differs from the store's last snapshot \(step 4\) in "
                       r"\['fc1.weight', 'fc2.weight'\] and matches none of its 3 snapshots"):
        Recorder(model, tmp_path / "r.zarr", every=2, trainable_only=False).start()


def test_resume_tells_a_new_run_from_an_older_checkpoint(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    fresh = {n: v.clone() for n, v in model.state_dict().items()}
    with Recorder(model, path, every=1) as rec:
        train_steps(model, opt, 3, gen, lambda k, loss: rec.step())
    model.load_state_dict(fresh)  # the same script run again, same seed
    with pytest.raises(StoreError, match=r"this looks like a new run: the model is the store's "
                       r"first snapshot \(step 0\), not its last \(step 3\); pass overwrite=True"):
        Recorder(model, path).start()
    torch.manual_seed(123)  # another seed
    with pytest.raises(StoreError, match=r"this looks like a new run: the model's weights are "
                       r"unrelated to the store's \(cosine -?0\.\d\d with its W_0\)"):
        Recorder(TinyNet(), path).start()


def test_resume_after_a_diverged_snapshot_says_so(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    with Recorder(model, path, every=1) as rec:
        train_steps(model, opt, 2, gen, lambda k, loss: rec.step())
        good = {n: v.clone() for n, v in model.state_dict().items()}
        with torch.no_grad():
            model.fc2.weight.fill_(float("nan"))
        with pytest.warns(RuntimeWarning, match="non-finite"):
            rec.step()
            rec.close()
    model.load_state_dict(good)
    with pytest.raises(StoreError, match=r"the store's last snapshot \(step 3\) has non-finite "
                       r"weights in \['fc2.weight'\]: the run diverged there.*the model equals "
                       r"the snapshot at step 2, so pass start_step=2, rewind=True"):
        Recorder(model, path).start()


def test_overwrite_starts_a_store_over_and_nothing_else(tiny, tmp_path):
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    with Recorder(model, path, every=1) as rec:
        train_steps(model, opt, 3, gen, lambda k, loss: rec.step())
    with Recorder(model, path, every=1, overwrite=True) as rec:
        train_steps(model, opt, 1, gen, lambda k, loss: rec.step())
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 1])
    np.testing.assert_array_equal(run.weights("fc1.weight", -1), model.fc1.weight.detach().numpy())
    assert "resumes" not in run.attrs
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("data")
    with pytest.raises(StoreError, match="exists and is not a spectra run store"):
        Recorder(model, folder, overwrite=True).start()
    assert (folder / "keep.txt").read_text() == "data"
    with Recorder(model, path, every=1):
        with pytest.raises(StoreLocked, match="held by process"):
            Recorder(model, path, overwrite=True).start()
    np.testing.assert_array_equal(spectra.open_run(path).steps, [0, 1])


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
    original = RunWriter.write

    def fail_at_step_3(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write", fail_at_step_3)
    with pytest.raises(RecordingError, match="No space left on device; the store keeps its 3 "
                       "committed"):
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
    original = RunWriter.write
    monkeypatch.setattr(RunWriter, "write", lambda self, *a, **k: (gate.wait(), original(self, *a, **k)))
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


def _marked_run(path, tiny, every, log, steps=6):
    """Train ``steps`` steps with ``optimizer=``; ``log(rec, k, where)`` is called before and
    after the k-th opt.step() (where = "before" / "after")."""
    model, opt, gen = tiny
    with Recorder(model, path, every=every, optimizer=opt) as rec:
        for k in range(1, steps + 1):
            ids, images, target = tiny_batch(gen)
            loss = (model(ids, images) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            log(rec, k, "before")
            opt.step()
            log(rec, k, "after")
    return spectra.open_run(path)


@pytest.mark.parametrize("side", ["before", "after"])
def test_logged_values_land_on_their_step_from_either_side_of_opt_step(tiny, tmp_path, side):
    """Marker k logged at step k, before or after opt.step(), at every=2: stored at steps
    0, 2, 4, 6 as [nan, 2, 4, 6]; the last one (logged after the last step) is kept."""
    def log(rec, k, where):
        if where == side:
            rec.log(marker=k)
    run = _marked_run(tmp_path / "r.zarr", tiny, 2, log)
    np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
    np.testing.assert_array_equal(run.scalars["marker"], [np.nan, 2, 4, 6])


def test_names_logged_on_both_sides_and_explicit_steps(tiny, tmp_path):
    def log(rec, k, where):
        if where == "before":
            rec.log(grad=10 * k)  # first logged before the first step: a before-step name
        else:
            rec.log(loss=k)  # first logged after it: an after-step name
            if k == 3:
                rec.log(late=0.5)  # first seen after a step: goes to the step just ended
            rec.log(upcoming=100 + k + 1, step=rec.global_step + 1)
    run = _marked_run(tmp_path / "r.zarr", tiny, 3, log)
    np.testing.assert_array_equal(run.steps, [0, 3, 6])
    np.testing.assert_array_equal(run.scalars["grad"], [np.nan, 30, 60])
    np.testing.assert_array_equal(run.scalars["loss"], [np.nan, 3, 6])
    np.testing.assert_array_equal(run.scalars["late"], [np.nan, 0.5, np.nan])
    np.testing.assert_array_equal(run.scalars["upcoming"], [np.nan, 103, 106])


def test_log_outside_the_current_or_next_step_is_refused(tiny, tmp_path):
    model, _, _ = tiny
    with Recorder(model, tmp_path / "r.zarr") as rec:
        rec.step()
        with pytest.raises(ValueError, match=r"log\(step=5\): values can only go to the step "
                           r"just ended \(1\) or the next one \(2\)"):
            rec.log(loss=1.0, step=5)
        rec.log(loss=2.0, step=1)
        assert rec.snapshot(note=3.0) is False  # step 1 has its snapshot: the scalars join it
    run = spectra.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.scalars["loss"], [np.nan, 2.0])
    np.testing.assert_array_equal(run.scalars["note"], [np.nan, 3.0])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_recording_into_a_url(tiny, tmp_path, scheme):
    model, opt, gen = tiny
    url = f"memory://runs/{tmp_path.name}.zarr" if scheme == "memory" else f"file://{tmp_path}/r.zarr"
    captured = {0: _capture(model)}
    with Recorder(model, url, every=2) as rec:
        def on_step(k, loss):
            if rec.step(loss=loss):
                captured[k] = _capture(model)
        train_steps(model, opt, 4, gen, on_step)
    run = spectra.open_run(url)
    np.testing.assert_array_equal(run.steps, [0, 2, 4])
    for t, step in enumerate(run.steps):
        for name in run.params:
            np.testing.assert_array_equal(run.weights(name, t), captured[step][name])
    with Recorder(model, url, every=2) as rec:  # resumed through the URL
        assert rec.global_step == 4
        train_steps(model, opt, 2, gen, lambda k, loss: rec.step())
    np.testing.assert_array_equal(spectra.open_run(url).steps, [0, 2, 4, 6])
    if scheme == "file":
        assert spectra.open_run(tmp_path / "r.zarr").path == tmp_path / "r.zarr"


def test_a_failing_start_releases_the_store(tiny, tmp_path):
    """An optimizer whose hook cannot be registered (as accelerate's wrapper): start() fails,
    and leaves no writer thread and no held lock behind."""
    model, _, gen = tiny

    class Unhookable(torch.optim.SGD):
        def register_step_post_hook(self, hook):
            raise AttributeError("no _optimizer_step_post_hooks here")

    with pytest.raises(AttributeError, match="no _optimizer_step_post_hooks"):
        Recorder(model, tmp_path / "r.zarr", optimizer=Unhookable(model.parameters(), lr=0.1)).start()
    assert not _writer_threads()
    with Recorder(model, tmp_path / "r.zarr") as rec:  # the store is free again
        assert rec.global_step == 0


def test_a_failed_start_leaves_no_thread_hook_or_half_made_store(tiny, tmp_path, monkeypatch):
    model, opt, _ = tiny

    def broken_capture(self, scalars, collected=None):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(Recorder, "_capture", broken_capture)
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
    with pytest.raises(StoreError, match="cannot resume"):
        Recorder(TinyNet(), tmp_path / "r.zarr").start()
    assert not _writer_threads()
    np.testing.assert_array_equal(spectra.open_run(tmp_path / "r.zarr").steps, [0, 1, 2])


def test_a_start_failing_after_it_opened_a_resumed_store_leaves_it_unlocked_and_its_data_as_is(
        tiny, tmp_path, monkeypatch):
    """The failure comes after the store was opened and locked (the first snapshot of a
    resumed store at a new start_step): the lock is given back, no snapshot is written."""
    from spectra.store.lock import read_holder
    model, opt, gen = tiny
    path = tmp_path / "r.zarr"
    with Recorder(model, path, every=1) as rec:
        train_steps(model, opt, 2, gen, lambda k, loss: rec.step())
    before = {name: spectra.open_run(path).weights(name, 2) for name in rec.params}

    def broken_capture(self, scalars, collected=None):
        assert read_holder(path)["pid"] == os.getpid() and "released_unix" not in read_holder(path)
        raise RuntimeError("device lost")

    monkeypatch.setattr(Recorder, "_capture", broken_capture)
    with pytest.raises(RuntimeError, match="device lost"):
        Recorder(model, path, every=1, start_step=5, optimizer=opt).start()
    assert "released_unix" in read_holder(path)
    assert not _writer_threads() and not opt._optimizer_step_post_hooks
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 1, 2])
    for name, weights in before.items():
        np.testing.assert_array_equal(run.weights(name, 2), weights)
    monkeypatch.undo()
    with Recorder(model, path, every=1, start_step=5):  # the store is free again
        pass
    np.testing.assert_array_equal(spectra.open_run(path).steps, [0, 1, 2, 5])
