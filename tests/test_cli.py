import errno
import os
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
