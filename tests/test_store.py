"""The run store: round trips, the commit protocol, reconstruction error, plain-zarr/xarray access."""

import json
import zlib

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

import spectra
from spectra.store import MatrixSpec, StoreError, create_run, resume_run


def _make(path, rng, shapes=None, update_dtype="float64"):
    shapes = shapes or {"a": (6, 4), "b": (3, 7)}
    specs = [MatrixSpec(n, s, s, "linear") for n, s in shapes.items()]
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    return create_run(path, specs, init, update_dtype=update_dtype), init


def test_round_trip_is_bitwise_for_float32_weights(tmp_path):
    rng = np.random.default_rng(0)
    writer, init = _make(tmp_path / "r.zarr", rng)
    truth = []
    for t, step in enumerate([0, 2, 5, 11]):
        w = {n: (v + rng.standard_normal(v.shape) * 0.3 * t).astype(np.float32) for n, v in init.items()}
        truth.append(w)
        writer.append(step, w, {"loss": 1.0 / (t + 1)})
    run = spectra.open_run(tmp_path / "r.zarr")
    assert run.params == ["a", "b"]
    np.testing.assert_array_equal(run.steps, [0, 2, 5, 11])
    assert run.steps.dtype == np.int64 and np.all(np.diff(run.time) >= 0)
    np.testing.assert_allclose(run.scalars["loss"], [1, 1 / 2, 1 / 3, 1 / 4])
    for t, w in enumerate(truth):
        for name in run.params:
            assert run.weights(name, t).dtype == np.float32
            np.testing.assert_array_equal(run.weights(name, t), w[name])
            np.testing.assert_array_equal(run.updates(name, t),
                                          w[name].astype(np.float64) - init[name])
    np.testing.assert_array_equal(run.init("a"), init["a"])
    stacked = run.weights("b", [3, 1])
    np.testing.assert_array_equal(stacked[0], truth[3]["b"])
    np.testing.assert_array_equal(stacked[1], truth[1]["b"])
    assert run.updates("a", slice(1, None)).shape == (3, 6, 4)
    np.testing.assert_array_equal(run.weights("a", -1), truth[-1]["a"])


def test_reconstruction_error_bound_on_adversarial_values(tmp_path):
    """Weights that cross zero or shrink by many orders of magnitude: the documented bound holds,
    and float64 updates are exact wherever |W_t| > 2^-29 |W_0|."""
    rng = np.random.default_rng(1)
    shape = (200, 300)
    w0 = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, shape)).astype(np.float32)
    wt = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-12, 2, shape)).astype(np.float32)
    for update_dtype in ("float64", "float32"):
        path = tmp_path / f"{update_dtype}.zarr"
        writer = create_run(path, [MatrixSpec("w", shape, shape, "linear")], {"w": w0},
                            update_dtype=update_dtype)
        writer.append(0, {"w": wt})
        back = spectra.open_run(path).weights("w", 0).astype(np.float64)
        err = np.abs(back - wt)
        if update_dtype == "float64":
            exact = np.abs(wt) > 2.0 ** -29 * np.abs(w0)
            assert 0.5 < exact.mean() < 1  # both regions are exercised
            np.testing.assert_array_equal(back[exact], wt[exact])
            bound = 2.0 ** -53 * np.abs(wt.astype(np.float64) - w0) + np.spacing(np.abs(wt)) / 2
        else:
            bound = np.spacing(np.maximum(np.abs(w0), np.abs(wt)))
            assert np.any(err > np.spacing(np.abs(wt)))  # why float64 is the default
        assert np.all(err <= bound)


def test_uncommitted_rows_are_invisible_and_written_over_on_resume(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "r.zarr"
    writer, init = _make(path, rng)
    for step in range(3):
        writer.append(step, {n: v + step for n, v in init.items()})
    # a process killed mid-commit: two more snapshots written, their time landed, steps not
    writer.write(3, {n: v + 99 for n, v in init.items()})
    writer.write(4, {n: v + 98 for n, v in init.items()})
    writer._series["time"].put(3, np.array([7.0, 8.0]))
    writer.abandon()
    run = spectra.open_run(path)
    assert len(run) == 3
    np.testing.assert_array_equal(run.steps, [0, 1, 2])
    with pytest.raises(IndexError, match="3 committed snapshots"):
        run.updates("a", 3)
    writer = resume_run(path)
    assert writer.length == 3 and writer.last_step == 2
    writer.append(7, {n: v - 1 for n, v in init.items()}, {"loss": 1.5})
    writer.close()
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 1, 2, 7])
    np.testing.assert_array_equal(run.weights("a", 3), init["a"] - 1)
    assert run.time[3] < 7.0  # the stale row was written over
    np.testing.assert_array_equal(run.scalars["loss"], [np.nan, np.nan, np.nan, 1.5])
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    assert root["steps"].shape == (4,) and root["params/a/updates"].shape == (4, 6, 4)


def test_steps_must_strictly_increase_and_nothing_is_committed_on_error(tmp_path):
    rng = np.random.default_rng(3)
    writer, init = _make(tmp_path / "r.zarr", rng)
    writer.append(5, init)
    with pytest.raises(StoreError, match="step 5 is not after the last step 5"):
        writer.append(5, init)
    with pytest.raises(StoreError, match="shape"):
        writer.append(6, {"a": np.zeros((2, 2), np.float32), "b": init["b"]})
    with pytest.raises(StoreError, match=r"lacks matrices \['b'\]"):
        writer.append(6, {"a": init["a"]})
    assert len(spectra.open_run(tmp_path / "r.zarr")) == 1


def test_scalars_appearing_later_are_padded_with_nan(tmp_path):
    rng = np.random.default_rng(4)
    writer, init = _make(tmp_path / "r.zarr", rng)
    writer.append(0, init)
    writer.append(1, init, {"lr": 0.5})
    writer.append(2, init, {"loss": 2.0})
    scalars = spectra.open_run(tmp_path / "r.zarr").scalars
    np.testing.assert_array_equal(scalars["lr"], [np.nan, 0.5, np.nan])
    np.testing.assert_array_equal(scalars["loss"], [np.nan, np.nan, 2.0])


def test_open_run_rejects_paths_that_are_not_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run store"):
        spectra.open_run(tmp_path / "missing.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a spectra run store"):
        spectra.open_run(plain)
    zarr.open_group(tmp_path / "other.zarr", mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match=r"attrs\['spectra'\] is missing"):
        spectra.open_run(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="exists and is not a run store; refusing to overwrite it"):
        _make(plain, np.random.default_rng(0))
    assert (plain / "notes.txt").read_text() == "hello"


def test_unknown_matrix_name_suggests_close_matches(tmp_path):
    writer, init = _make(tmp_path / "r.zarr", np.random.default_rng(5),
                         {"blocks.0.fc.weight": (3, 3)})
    writer.append(0, init)
    run = spectra.open_run(tmp_path / "r.zarr")
    with pytest.raises(KeyError, match="did you mean"):
        run.init("blocks.0.fc.wieght")


def test_plain_zarr_reads_the_documented_layout(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "r.zarr"
    writer, init = _make(path, rng)
    w1 = {n: (v * 2).astype(np.float32) for n, v in init.items()}
    writer.append(0, init)
    writer.append(3, w1, {"loss": 0.25})
    writer.close()
    root = zarr.open_group(path, mode="r", use_consolidated=False)
    meta = root.attrs["spectra"]
    assert meta["schema"] == 2 and meta["params"] == ["a", "b"] and meta["committed"] == 2
    json.dumps(dict(root.attrs))  # attrs are plain JSON
    np.testing.assert_array_equal(root["steps"][:], [0, 3])
    updates = root["params/a/updates"]
    assert updates.chunks == (1, 6, 4)
    assert updates.metadata.dimension_names == ("snapshot", "row", "col")
    np.testing.assert_array_equal(root["params/a/init"][:] + updates[1], w1["a"])
    assert root["params/b"].attrs["shape"] == [3, 7]
    assert root["scalars/loss"][1] == 0.25
    assert root["locks/writer"].attrs["lock"]["released_unix"] > 0
    for name in ("steps", "time", "digests", "scalars/loss", "params/a/init", "params/a/updates"):
        assert root[name].metadata.codecs[-1] == Crc32cCodec(), name  # every chunk checksummed
    np.testing.assert_array_equal(root["digests"][1], [zlib.crc32(w1["a"]), zlib.crc32(w1["b"])])


def test_xarray_opens_root_and_param_groups(tmp_path):
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(7)
    path = tmp_path / "r.zarr"
    writer, init = _make(path, rng)
    for step in (0, 4):
        writer.append(step, {n: v + step for n, v in init.items()})
    writer.close()
    root = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(root["steps"].values, [0, 4])
    param = xr.open_zarr(path, group="params/a", consolidated=False)
    assert param["updates"].dims == ("snapshot", "row", "col")
    assert param["init"].dims == ("row", "col")
    weights = param["init"] + param["updates"]
    np.testing.assert_array_equal(weights.isel(snapshot=1).values, init["a"] + 4)


def test_the_parameter_dtype_is_kept_and_old_stores_fall_back_to_init(tmp_path):
    w0 = np.zeros((3, 2), np.float32)
    writer = create_run(tmp_path / "a.zarr", [MatrixSpec("w", (3, 2), (3, 2), "linear", "bfloat16"),
                                              MatrixSpec("v", (3, 2), (3, 2), "linear")],
                        {"w": w0, "v": w0})
    writer.append(0, {"w": w0, "v": w0})
    run = spectra.open_run(tmp_path / "a.zarr")
    assert run.spec("w").dtype == "bfloat16" and run.spec("v").dtype == "float32"
    root = zarr.open_group(tmp_path / "a.zarr", mode="r+", use_consolidated=False)
    del root["params/w"].attrs["dtype"]  # a store written before the attribute existed
    assert spectra.open_run(tmp_path / "a.zarr").spec("w").dtype == "float32"


def _schema1_store(path, init, steps):
    """A store as spectra wrote it before schema 2 (no checksums, no digests, arrays grown one
    row per snapshot, an all-zero W_0 chunk never written), built with plain zarr."""
    blosc = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    root = zarr.open_group(path, mode="w", use_consolidated=False, attributes={"spectra": {
        "schema": 1, "created": "2026-01-01T00:00:00+00:00", "created_unix": 1.7e9,
        "params": list(init), "update_dtype": "float64"}})
    for name, w0 in init.items():
        group = root.create_group(f"params/{name}", attributes={
            "name": name, "shape": list(w0.shape), "original_shape": list(w0.shape),
            "kind": "linear"})
        group.create_array("init", data=w0, chunks=w0.shape, compressors=(blosc,),
                           dimension_names=("row", "col"))
        updates = group.create_array("updates", shape=(len(steps), *w0.shape),
                                     chunks=(1, *w0.shape), dtype="float64", fill_value=np.nan,
                                     compressors=(blosc,), dimension_names=("snapshot", "row", "col"))
        for t, step in enumerate(steps):
            updates[t] = np.full(w0.shape, float(step))
    root.create_group("scalars")
    for name, values, fill in (("time", np.arange(len(steps), dtype=float), np.nan),
                               ("steps", np.asarray(steps, dtype=np.int64), -1)):
        root.create_array(name, data=values, chunks=(1024,), fill_value=fill,
                          dimension_names=("snapshot",))


def test_schema_1_stores_still_open_and_resume(tmp_path):
    path = tmp_path / "old.zarr"
    init = {"a": np.zeros((4, 3), np.float32), "b": np.ones((2, 5), np.float32)}
    _schema1_store(path, init, [0, 5, 10])
    assert not (path / "params/a/init/c/0/0").exists()  # schema 1 skipped the zero W_0
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 5, 10])
    np.testing.assert_array_equal(run.weights("a", 2), np.full((4, 3), 10, np.float32))
    assert spectra.store.verify_run(path).ok
    writer = resume_run(path)
    writer.append(11, {"a": init["a"] + 1, "b": init["b"] + 1}, {"loss": 0.5})
    assert writer.digests() is None  # none were recorded; nothing pretends otherwise
    writer.close()
    run = spectra.open_run(path)
    np.testing.assert_array_equal(run.steps, [0, 5, 10, 11])
    np.testing.assert_array_equal(run.weights("b", 3), init["b"] + 1)
    np.testing.assert_array_equal(run.scalars["loss"], [np.nan, np.nan, np.nan, 0.5])
    assert run.attrs["schema"] == 2 and run.attrs["upgraded_from"] == 1


@pytest.mark.parametrize("in_place", [False, True])
def test_whole_chunk_writes_are_the_bytes_zarr_writes(tmp_path, in_place):
    """ChunkWriter's sync path (through the store, or in place) and zarr's own setitem write
    the same key and bytes."""
    from spectra.store.chunks import ChunkWriter
    rng = np.random.default_rng(8)
    codecs = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec())
    values = rng.standard_normal((3, 5, 7))
    for separator in ("/", "."):
        root = zarr.open_group(tmp_path / f"z{separator == '.'}", mode="w")
        ours, theirs = (root.create_array(name, shape=(3, 5, 7), chunks=(1, 5, 7), dtype="f8",
                                          compressors=codecs, chunk_key_encoding={
                                              "name": "default", "separator": separator})
                        for name in ("ours", "theirs"))
        writer = ChunkWriter(ours, in_place=in_place)
        assert writer.fast
        for row in range(3):
            writer.write((row, 0, 0), values[row])
            theirs[row] = values[row]
        key = theirs.metadata.encode_chunk_key((1, 0, 0))
        folder = tmp_path / f"z{separator == '.'}"
        assert (folder / "ours" / key).read_bytes() == (folder / "theirs" / key).read_bytes()
        np.testing.assert_array_equal(ours[:], values)


def test_arrays_grow_ahead_and_scalars_may_appear_late(tmp_path):
    """Past one series chunk (1024 snapshots): one resize per 1024 rows, a scalar first seen
    at snapshot 1030 reads NaN before it, and close() cuts every array to the committed length."""
    writer, init = _make(tmp_path / "r.zarr", np.random.default_rng(9), {"w": (2, 2)})
    for step in range(1040):
        writer.write(step, {"w": init["w"] + step}, {"late": float(step)} if step >= 1030 else None)
        if step in (500, 1035):
            writer.commit()
    assert writer._capacity == 2048
    writer.close()
    run = spectra.open_run(tmp_path / "r.zarr")
    assert len(run) == 1040 and run._root["params/w/updates"].shape == (1040, 2, 2)
    late = run.scalars["late"]
    assert np.isnan(late[:1030]).all() and np.array_equal(late[1030:], np.arange(1030, 1040))
    np.testing.assert_array_equal(run.weights("w", 1039), init["w"] + 1039)
    assert spectra.store.verify_run(tmp_path / "r.zarr").ok


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_stores_at_urls_round_trip(tmp_path, scheme):
    url = (f"memory://stores/{tmp_path.name}/r.zarr" if scheme == "memory"
           else f"file://{tmp_path}/r.zarr")
    writer, init = _make(url, np.random.default_rng(10))
    assert writer._updates["a"].fast == (scheme == "file")  # fsspec stores: zarr's own path
    writer.append(0, init, {"loss": 1.0})
    writer.append(2, {n: v * 2 for n, v in init.items()})
    with pytest.raises(spectra.store.StoreLocked):
        resume_run(url)  # still held by `writer`
    writer.close()
    run = spectra.open_run(url)
    np.testing.assert_array_equal(run.steps, [0, 2])
    np.testing.assert_array_equal(run.weights("b", 1), init["b"] * 2)
    np.testing.assert_array_equal(run.scalars["loss"], [1.0, np.nan])
    assert spectra.store.verify_run(url).ok and spectra.store.is_run_store(url)
    writer = resume_run(url)
    writer.append(3, init)
    writer.close()
    np.testing.assert_array_equal(spectra.open_run(url).steps, [0, 2, 3])
