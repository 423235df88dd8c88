import errno
import inspect
import os
import re
import subprocess
import sys

import numpy as np
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
    for seed, folder in ((0, "a"), (1, "b")):  # same file name, different folders
        mlp_run("full", tmp_path / folder / "run.zarr", quiet=True,
                training=ClassifierTraining(epochs=1, seed=seed), every=20)
    assert main(["analyze", str(tmp_path / "a" / "run.zarr"), "-o", str(tmp_path / "f.csv"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    frame = pandas.read_csv(tmp_path / "f.csv")
    assert list(frame.columns) == ["step", "param", "target", "metric", "value"]
    assert "layers.0.weight" in out and "erank ΔW" in out
    assert main(["analyze", str(tmp_path / "a" / "run.zarr"), "-o", str(tmp_path / "f.parquet"),
                 "--quiet"]) == 0  # pyarrow comes with spectra
    parquet = pandas.read_parquet(tmp_path / "f.parquet")
    pandas.testing.assert_frame_equal(parquet.astype({"param": str, "target": str, "metric": str}),
                                      frame, check_dtype=False)
    assert main(["plot", str(tmp_path / "a" / "run.zarr"), str(tmp_path / "b" / "run.zarr"),
                 "-o", str(tmp_path / "fig"), "--k", "0", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["a-run-ranks.png", "a-run-singular-values.png", "b-run-ranks.png",
                     "b-run-singular-values.png", "compare-effective_rank-updates.png",
                     "compare-effective_rank-weights.png"]
    assert main(["analyze", str(tmp_path / "a" / "run.zarr"), "-o", str(tmp_path / "f.txt")]) == 2


@pytest.fixture
def small_store(tmp_path):
    """A closed store of one 6×5 matrix at steps 0..3."""
    from spectra.store import MatrixSpec, create_run
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 5)).astype(np.float32)
    writer = create_run(tmp_path / "s.zarr", [MatrixSpec("w", (6, 5), (6, 5), "linear")], {"w": w0})
    for step in range(4):
        writer.append(step, {"w": w0 + step * rng.standard_normal((6, 5)).astype(np.float32)})
    writer.close()
    return tmp_path / "s.zarr"


def _error_line(capsys):
    """The one line on stderr (the report on stdout, if any, is dropped)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_a_damaged_chunk_is_one_line_and_verify_repair_report_it(small_store, capsys):
    chunk = small_store / "params/w/updates/c.2.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    assert main(["analyze", str(small_store), "--quiet", "--k", "0"]) == 2
    assert _error_line(capsys).startswith(f"spectra analyze: error: {small_store}: "
                                          "params/w/updates, snapshot 2 (step 2): damaged chunk")
    assert main(["verify", str(small_store)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert "snapshot 2 (step 2): damaged chunk" in out[0]
    assert "the first 2 of 4 snapshots are intact" in out[-1]
    assert main(["repair", str(small_store)]) == 2  # says what it would do, changes nothing
    assert "nothing changed" in capsys.readouterr().out
    assert main(["repair", str(small_store), "--cut"]) == 0
    assert "cut back from 4 to 2 snapshots" in capsys.readouterr().out
    assert main(["verify", str(small_store)]) == 0
    assert "intact: 2 committed snapshots" in capsys.readouterr().out


def test_a_missing_output_folder_is_named(small_store, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "frame.csv"
    assert main(["analyze", str(small_store), "-o", str(target), "--quiet", "--k", "0"]) == 2
    line = _error_line(capsys)
    assert line.startswith("spectra analyze: error: ") and str(target.parent) in line
    assert "non-existent directory" in line or "does not exist" in line


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device (free some "
                                          "space; a recording can then be resumed)"),
                                         (errno.EROFS, "read-only file system (write somewhere "
                                          "else)")])
def test_disk_full_or_read_only_is_one_line(small_store, monkeypatch, capsys, code, words):
    from spectra.store.chunks import ChunkWriter
    (small_store / "params/w/updates/c.3.0.0").unlink()

    def refuse(self, coords, values):
        raise OSError(code, os.strerror(code), str(small_store / "steps/c/0"))
    monkeypatch.setattr(ChunkWriter, "write", refuse)
    assert main(["repair", str(small_store), "--cut"]) == 2
    assert _error_line(capsys) == f"spectra repair: error: {small_store / 'steps/c/0'}: {words}"


def test_a_locked_store_names_its_writer(small_store, capsys):
    from spectra.store import StoreLock
    (small_store / "params/w/updates/c.3.0.0").unlink()
    with StoreLock(small_store):
        assert main(["repair", str(small_store), "--cut"]) == 2
    assert f"the writer lock is held by process {os.getpid()}" in _error_line(capsys)


def test_an_internal_error_is_status_1_with_the_traceback_behind_debug(small_store, monkeypatch,
                                                                       capsys):
    import spectra.store

    def broken(path):
        raise RuntimeError("an invariant broke")
    monkeypatch.setattr(spectra.store, "verify_run", broken)
    assert main(["verify", str(small_store)]) == 1
    assert _error_line(capsys) == ("spectra verify: internal error: RuntimeError: an invariant "
                                   "broke (a bug in spectra; rerun with --debug for the traceback, "
                                   "and please report it)")
    assert main(["verify", str(small_store), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "verify", str(small_store)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_train_help_shows_defaults_and_every_methods_options_from_its_factory(capsys):
    from spectra.methods.inrank.controller import to_inrank
    from spectra.methods.inrank.methods import PRESETS as INRANK_PRESETS
    from spectra.methods.oialr.controller import OIALR
    from spectra.methods.oialr.methods import PRESETS as OIALR_PRESETS
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "--steps STEPS optimizer steps (gpt) (default: 1500)" in out
    assert "--threads N" in out and "(default: 1)" in out
    methods = out.split("methods and their options (-O")[1]
    assert "full: none" in methods
    inrank = methods.split("inrank:")[1].split("inrank-")[0]
    for name, parameter in inspect.signature(to_inrank).parameters.items():
        if name not in ("model", "layers"):  # the factory's own `layers` is listed first
            # what a run without -O uses: the default preset's value, else the layer's default
            default = INRANK_PRESETS["ours"].get(name, parameter.default)
            assert f"{name}={default!r}" in inrank
    assert "buffer=8" in inrank and "rule_input='increment'" in inrank and "lr_scale=4.0" in inrank
    for name in ("beta", "keep_first", "keep_last", "keep_among", "min_rank_fraction"):
        default = OIALR_PRESETS["ours"].get(name, inspect.signature(OIALR).parameters[name].default)
        assert f"{name}={default!r}" in methods.split("oialr:")[1]


def test_defaults_in_help_are_the_ones_used():
    from spectra.cli import _parser
    from spectra.methods.theory.suite import SWEEP_ALPHAS
    theory = _parser().parse_args(["theory"])
    assert [float(a) for a in theory.alphas.split(",")] == list(SWEEP_ALPHAS)
    assert theory.threads == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "nope"], "method='nope'; accepted: ['fixed-rank', 'full'"),
    (["train", "--method", "inrank", "--task", "mlp", "-O", "buffr=8"],
     "unknown InRank option(s) ['buffr']; accepted: ['alpha', 'buffer'"),
    (["train", "-O", "buffer"], "option 'buffer': expected KEY=VALUE"),
])
def test_train_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_bad_thread_counts_are_refused_by_the_parser(capsys):
    for command in ("demo", "train", "theory"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--threads", "0"])
        assert exit_.value.code == 2
        assert "--threads: '0': expected a whole number >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_replaces_a_store_only_with_overwrite(tmp_path, capsys):
    argv = ["train", "--task", "mlp", "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    store = tmp_path / "mlp-full-s0.zarr"
    first = spectra.open_run(store).attrs["created"]
    assert main(argv) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert spectra.open_run(store).attrs["created"] != first
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", capsys.readouterr().out).group(1))
    assert accuracy > 0.8  # one epoch of the MLP on MNIST-5k; chance is 0.1


@pytest.mark.parametrize("device, message", [
    ("gpu", "device must be 'cpu' or 'cuda', got 'gpu'"),
    ("cuda:0", "device='cuda' but torch.cuda.is_available() is False"),
])
def test_a_bad_device_is_a_one_line_error(tmp_path, capsys, tiny, device, message):
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from conftest import train_steps
    model, optimizer, generator = tiny
    with spectra.Recorder(model, tmp_path / "run.zarr") as rec:
        train_steps(model, optimizer, 2, generator, on_step=lambda k, loss: rec.step())
    for command in (["analyze", str(tmp_path / "run.zarr")],
                    ["plot", str(tmp_path / "run.zarr"), "-o", str(tmp_path / "fig")]):
        assert main(command + ["--device", device, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
