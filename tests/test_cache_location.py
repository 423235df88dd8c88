"""Where the analysis cache lives: inside the store, at a path of its own, or in memory (also,
automatically, for a store that cannot be written); and which cached rows it trusts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectra.analysis.analyzer import analyze
from spectra.store import MatrixSpec, create_run, resume_run

SHAPES = {"w": (20, 12), "v": (9, 15)}


def make_store(path, steps, seed=0):
    rng = np.random.default_rng(seed)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    writer = create_run(path, [MatrixSpec(n, s, s, "linear") for n, s in SHAPES.items()], weights)
    for step in steps:
        weights = {n: (w + 0.1 * rng.standard_normal(w.shape)).astype(np.float32)
                   for n, w in weights.items()}
        writer.append(step, weights)
    return writer


def files(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def test_a_cache_path_keeps_the_store_untouched_and_is_reused(tmp_path):
    make_store(tmp_path / "run.zarr", range(5))
    before = files(tmp_path / "run.zarr")
    first = analyze(tmp_path / "run.zarr", k=3, cache=tmp_path / "cache.zarr", quiet=True)
    assert files(tmp_path / "run.zarr") == before
    shutil.copytree(tmp_path / "run.zarr", tmp_path / "copy.zarr")
    pd.testing.assert_frame_equal(first, analyze(tmp_path / "copy.zarr", k=3, quiet=True))
    shutil.rmtree(tmp_path / "copy.zarr")
    again = analyze(tmp_path / "run.zarr", k=3, cache=str(tmp_path / "cache.zarr"), quiet=True)
    pd.testing.assert_frame_equal(again, first)
    make_store(tmp_path / "other.zarr", range(5), seed=1)
    with pytest.raises(ValueError, match="belongs to another store"):
        analyze(tmp_path / "other.zarr", cache=tmp_path / "cache.zarr", quiet=True)


def test_a_cache_in_memory_writes_nothing(tmp_path):
    make_store(tmp_path / "run.zarr", range(4))
    before = files(tmp_path / "run.zarr")
    frame = analyze(tmp_path / "run.zarr", k=2, cache="memory", quiet=True)
    assert files(tmp_path / "run.zarr") == before
    pd.testing.assert_frame_equal(frame, analyze(tmp_path / "run.zarr", k=2, quiet=True))


CHILD = """
import sys, warnings
from spectra.analysis.analyzer import analyze
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    frame = analyze(sys.argv[1], k=3, quiet=True)
frame.to_pickle(sys.argv[2])
print("|".join(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
"""


def analyze_read_only(store: Path, out: Path) -> subprocess.CompletedProcess:
    """analyze() in a child that sees ``store`` read-only: a read-only bind mount in a mount
    namespace of its own when root (permissions do not stop root), else no write permission."""
    command = [sys.executable, "-c", CHILD, str(store), str(out)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only mount as root")
        mount = f"mount --bind -o ro {store} {store} && exec \"$@\""
        command = ["unshare", "--mount", "sh", "-c", mount, "sh", *command]
        return subprocess.run(command, capture_output=True, text=True)
    for path in [store, *store.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        return subprocess.run(command, capture_output=True, text=True)
    finally:
        for path in [store, *store.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_a_read_only_store_is_analyzed_with_its_cache_in_memory(tmp_path):
    make_store(tmp_path / "run.zarr", range(5))
    before = files(tmp_path / "run.zarr")
    result = analyze_read_only(tmp_path / "run.zarr", tmp_path / "frame.pkl")
    if result.returncode and result.stderr.startswith(("mount:", "unshare:")):
        pytest.skip(f"no read-only mount here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "cannot be written" in result.stdout and "cached in memory" in result.stdout
    assert files(tmp_path / "run.zarr") == before
    frame = pd.read_pickle(tmp_path / "frame.pkl")
    pd.testing.assert_frame_equal(frame, analyze(tmp_path / "run.zarr", k=3, quiet=True))


def test_cached_rows_of_snapshots_the_store_no_longer_has_are_recomputed(tmp_path, monkeypatch):
    """A store cut back and recorded again reuses steps: the cache tells rows by their time."""
    rng = np.random.default_rng(3)

    def weights():
        return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}

    writer = create_run(tmp_path / "first.zarr",
                        [MatrixSpec(n, s, s, "linear") for n, s in SHAPES.items()], weights())
    for step in (0, 1):
        writer.append(step, weights(), time=float(step))
    shutil.copytree(tmp_path / "first.zarr", tmp_path / "again.zarr")  # same store identity
    for step in (2, 3):
        writer.append(step, weights(), time=float(step))
    again = resume_run(tmp_path / "again.zarr")
    for step in (2, 3):
        again.append(step, weights(), time=step + 0.5)  # the same steps, recorded again
    cache = tmp_path / "cache.zarr"
    analyze(tmp_path / "first.zarr", k=2, cache=cache, quiet=True)
    counted = count_decompositions(monkeypatch)
    frame = analyze(tmp_path / "again.zarr", k=2, cache=cache, quiet=True)
    # rows 2 and 3 of both targets of both matrices, and row 1 once to anchor the stability
    assert counted() == 2 * 2 * 3
    pd.testing.assert_frame_equal(frame, analyze(tmp_path / "again.zarr", k=2, quiet=True))


def count_decompositions(monkeypatch):
    import spectra.analysis.extend as extend
    count = [0]
    original = extend.series_svd

    def counting(a, *args, **kwargs):
        count[0] += len(a)
        return original(a, *args, **kwargs)

    monkeypatch.setattr(extend, "series_svd", counting)
    return lambda: count[0]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_stores_and_caches_at_urls_give_the_local_frame(tmp_path, scheme):
    """A store at a URL is analyzed like a local one, its cache inside it (or at a URL of its
    own), and the analyzers' lock files are the store's locks/<name>/zarr.json."""
    make_store(tmp_path / "local.zarr", range(4)).close()
    reference = analyze(tmp_path / "local.zarr", k=3, cache="memory", quiet=True)
    url = (f"memory://{tmp_path.name}/run.zarr" if scheme == "memory"
           else f"file://{tmp_path}/run.zarr")
    make_store(url, range(4)).close()
    same = dict(check_exact=False, rtol=1e-12, atol=1e-12)
    frame = analyze(url, k=3, quiet=True)
    pd.testing.assert_frame_equal(frame, reference, **same)
    pd.testing.assert_frame_equal(analyze(url, k=3, quiet=True), reference, **same)  # cached
    cache_url = f"memory://{tmp_path.name}/cache.zarr"
    pd.testing.assert_frame_equal(analyze(tmp_path / "local.zarr", k=3, cache=cache_url,
                                          quiet=True), reference, **same)
    if scheme == "file":
        locks = sorted(p.parent.name for p in (tmp_path / "run.zarr" / "locks").glob("*/zarr.json"))
        assert locks == ["analysis-cache", "analysis-cache.k3.updates.v",
                         "analysis-cache.k3.updates.w", "analysis-cache.k3.weights.v",
                         "analysis-cache.k3.weights.w", "writer"]
        assert not [p for p in (tmp_path / "run.zarr").rglob("*lock*") if "locks" not in p.parts]
