"""StoreLock: one holder at a time, across processes, with the holder named and dead holders'
locks taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from spectra.store.lock import STALE_AFTER, StoreLock, StoreLocked, read_holder

HOLD = textwrap.dedent("""
    import sys, time
    from spectra.store.lock import StoreLock
    lock = StoreLock(sys.argv[1], name=sys.argv[2], purpose="test holder").acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    lock.release()
""")


def _holder(directory, seconds, name="writer"):
    """A child process that holds the lock for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), name, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_second_holder_fails_at_once_naming_the_first(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLocked, match=rf"held by process {proc.pid} on "
                           rf"{socket.gethostname()} \(a test holder started") as caught:
            StoreLock(tmp_path).acquire()
        assert time.monotonic() - started < 1.0
        assert caught.value.holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    proc = _holder(tmp_path, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_holder(tmp_path)["pid"] == proc.pid  # its record stays behind
    with pytest.warns(RuntimeWarning, match=rf"taking over the writer lock left by process "
                      rf"{proc.pid} on {socket.gethostname()}.*which is gone"):
        lock = StoreLock(tmp_path).acquire()
    assert read_holder(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert read_holder(tmp_path)["released_unix"] > 0


def test_waiting_for_a_holder_that_releases(tmp_path):
    proc = _holder(tmp_path, 0.5)
    lock = StoreLock(tmp_path).acquire(timeout=20)
    assert lock.held and proc.wait() == 0
    lock.release()


def test_a_clean_release_is_no_takeover_and_names_are_independent(tmp_path, recwarn):
    with StoreLock(tmp_path) as writer:
        with StoreLock(tmp_path, name="analysis", purpose="analysis cache"):
            with pytest.raises(StoreLocked, match="writer lock is held by process"):
                StoreLock(tmp_path).acquire()  # the same process, another open file: refused
        assert writer.still_ours()
    with StoreLock(tmp_path):
        pass
    assert not [w for w in recwarn if "taking over" in str(w.message)]


def _forge(directory, record):
    """Write a holder's record into the lock file, as another host's process would."""
    lock_file = directory / "locks" / "writer" / "zarr.json"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                     "attributes": {"lock": record}}))


def test_another_hosts_record_is_refused_while_fresh_and_taken_over_when_stale(tmp_path):
    record = {"purpose": "writer", "host": "node-17", "pid": 4242, "started": "earlier",
              "started_unix": time.time() - 600, "heartbeat_unix": time.time() - 5}
    _forge(tmp_path, record)
    with pytest.raises(StoreLocked, match=r"process 4242 on node-17 .*last heartbeat 5 s ago"):
        StoreLock(tmp_path).acquire()
    record["heartbeat_unix"] = time.time() - STALE_AFTER - 1
    _forge(tmp_path, record)
    with pytest.warns(RuntimeWarning, match="left by process 4242 on node-17.*heartbeat"):
        StoreLock(tmp_path).acquire().release()


def test_the_holder_notices_its_directory_replaced(tmp_path):
    store = tmp_path / "run.zarr"
    store.mkdir()
    lock = StoreLock(store).acquire()
    store.rename(tmp_path / "moved.zarr")
    store.mkdir()
    StoreLock(store).acquire().release()  # a new store with its own lock file
    assert not lock.still_ours()
    lock.moved_to(tmp_path / "moved.zarr")
    assert lock.still_ours()
    lock.release()


def test_file_urls_and_paths_are_the_same_lock(tmp_path):
    with StoreLock(f"file://{tmp_path}"):
        with pytest.raises(StoreLocked):
            StoreLock(tmp_path).acquire()


def test_memory_stores_lock_within_the_process():
    first = StoreLock("memory://locks/a.zarr").acquire()
    with pytest.raises(StoreLocked, match=f"held by process {os.getpid()}"):
        StoreLock("memory://locks/a.zarr").acquire()
    StoreLock("memory://locks/b.zarr").acquire().release()  # another store: free
    first.release()
    StoreLock("memory://locks/a.zarr").acquire().release()


def test_a_missing_directory_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such store"):
        StoreLock(tmp_path / "absent.zarr").acquire()
    assert not (tmp_path / "absent.zarr").exists()


@pytest.fixture
def object_store():
    """An fsspec filesystem that is neither local nor memory://: the object-store code path."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class ObjectStore(MemoryFileSystem):
        protocol = "objstore"
        store: dict = {}
        pseudo_dirs = [""]

    fsspec.register_implementation("objstore", ObjectStore, clobber=True)
    yield "objstore://bucket"
    ObjectStore.store.clear()


def test_object_stores_get_a_best_effort_record(object_store):
    lock = StoreLock(f"{object_store}/a.zarr").acquire()
    holder = read_holder(f"{object_store}/a.zarr")
    assert holder["pid"] == os.getpid() and holder["token"] == lock.record["token"]
    with pytest.raises(StoreLocked, match="held by process"):
        StoreLock(f"{object_store}/a.zarr").acquire()  # its record is fresh
    lock.release()
    assert read_holder(f"{object_store}/a.zarr")["released_unix"] > 0
    StoreLock(f"{object_store}/a.zarr").acquire().release()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_named(tmp_path):
    from spectra.store.lock import StoreReadOnly
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(StoreReadOnly, match="cannot take the writer lock"):
            StoreLock(tmp_path).acquire()
    finally:
        tmp_path.chmod(0o755)


def test_locks_are_zarr_groups_that_name_their_holder(tmp_path):
    import warnings

    import zarr
    zarr.open_group(tmp_path, mode="w").create_array("x", shape=(2,), dtype="f4")
    with StoreLock(tmp_path) as lock:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # zarr warns about any foreign file in a group
            root = zarr.open_group(tmp_path, mode="r")
            assert sorted(root.group_keys()) == ["locks"] and list(root.array_keys()) == ["x"]
            assert root["locks/writer"].attrs["lock"]["token"] == lock.record["token"]
