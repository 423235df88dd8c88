"""One holder at a time: a named lock inside a store (or any directory), held for the
holder's life, that records who holds it.

    with StoreLock("runs/gpt.zarr") as lock:               # the writer lock, "writer"
        ...                                                 # a second holder fails at once
    StoreLock(path, name="analysis-cache.k8.weights.fc.weight",
              purpose="analysis cache").acquire(timeout=30)        # one analysis cache entry

The lock named N is the file ``locks/N/zarr.json``: the metadata of an empty zarr group whose
attributes hold the record of its holder (host, pid, start time, heartbeat), so that zarr and
xarray see the store's locks as ordinary groups (any other file makes zarr warn on every
listing) and ``zarr.open_group(store)["locks/writer"].attrs["lock"]`` says who holds it.

Local directories (plain paths, ``file://``): an OS advisory lock (``fcntl.flock``) on the lock
file, so the lock dies with its process, whatever kills it. The file is written in place and
never deleted or replaced (that would let two holders lock two different files); a refused
holder's error quotes the record. A record left by a process that
died without releasing is taken over with a warning: on the same host when that pid is gone (or
the OS says nobody holds the lock); from another host when its heartbeat is older than
``STALE_AFTER`` seconds (filesystems whose locks do not span hosts). The holder refreshes its
heartbeat with :meth:`StoreLock.heartbeat`.

``memory://`` stores live in one process: the lock is an in-process registry, exact.
Other fsspec URLs (object stores) have no locks: the record is written as an object and read back,
a best effort that refuses a second holder whose record is fresh, but two holders starting within
the same moment can both win (docs/store.md).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from spectra.store.format import StoreError
from spectra.store.location import Location, PathOrURL

WRITER_LOCK = "writer"  # the Recorder's (one writer per store)
ANALYSIS_LOCK = "analysis-cache"  # the analysis cache's locks: this, and this.k<k>.<target>.<param>
LOCKS = "locks"  # the group holding the locks
STALE_AFTER = 120.0  # seconds without a heartbeat after which another host's record is stale
_RECORD_BYTES = 4096  # records are padded to this size and written in place (never truncated)
_GROUP = {"zarr_format": 3, "node_type": "group"}
_POLL = 0.1  # seconds between attempts while waiting for a lock (acquire(timeout=...))
_BEST_EFFORT_SETTLE = 0.2  # seconds between writing a record to an object store and reading it back

_process_locks: dict[str, dict[str, Any]] = {}  # memory:// lock path → holder record
_process_guard = threading.Lock()


class StoreLocked(StoreError):
    """Another holder has the lock. ``holder`` is its record (host, pid, started, ...)."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder


class StoreReadOnly(StoreError):
    """The lock file cannot be created or written: the store is read-only to this process."""


class StoreLock:
    """An exclusive lock named ``name`` inside ``location``; see the module docstring.

    ``purpose`` names the holder's role in messages ("writer", "analysis cache", ...).
    """

    def __init__(self, location: PathOrURL | Location, name: str = WRITER_LOCK,
                 purpose: str = "writer"):
        self.location = Location.of(location)
        self.name = name
        self.purpose = purpose
        self.record: dict[str, Any] | None = None  # ours, while held
        self._fd: int | None = None
        self._file: str | None = None  # the local lock file's path
        self._last_beat = 0.0

    @property
    def held(self) -> bool:
        return self.record is not None

    def __enter__(self) -> StoreLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        """A lock whose holder object is gone is released, like a file closed on collection."""
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown

    def __repr__(self) -> str:
        return f"StoreLock({str(self.location)!r}, {self.name!r}, held={self.held})"

    # -- acquiring and releasing ------------------------------------------------------------

    def acquire(self, timeout: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to ``timeout`` seconds for its holder to release it.

        Raises StoreLocked (naming the holder), StoreReadOnly, or FileNotFoundError if the
        location does not exist. Changes nothing in the store when it fails, but for creating
        an empty lock file.
        """
        if self.held:
            raise RuntimeError(f"{self!r} is already held by this object")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._try_acquire()
                return self
            except StoreLocked:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(_POLL)

    def release(self) -> None:
        """Give the lock back (idempotent); the record says it was released."""
        if not self.held:
            return
        record = {**self.record, "released_unix": time.time()}
        try:
            if self.location.protocol == "memory":
                with _process_guard:
                    _process_locks.pop(self._key(), None)
            elif self.location.is_local:
                _write_record(self._fd, record)
            else:
                self._put_remote(record)
        except OSError:
            pass  # the store vanished or went read-only: nothing left to release but the fd
        finally:
            if self._fd is not None:
                os.close(self._fd)  # closing drops the flock
                self._fd = None
            self.record = None

    def heartbeat(self, every: float = 10.0) -> None:
        """Refresh the holder's heartbeat if ``every`` seconds have passed since the last one."""
        now = time.time()
        if not self.held or now - self._last_beat < every:
            return
        self.record = {**self.record, "heartbeat_unix": now}
        self._last_beat = now
        if self.location.protocol == "memory":
            return
        if self.location.is_local:
            _write_record(self._fd, self.record)
        else:
            self._put_remote(self.record)

    def still_ours(self) -> bool:
        """False if the lock file we hold is no longer the one at its path (the store was
        deleted, moved or replaced)."""
        if not self.held:
            return False
        if self.location.is_local:
            try:
                return os.stat(self._path()).st_ino == os.fstat(self._fd).st_ino
            except (FileNotFoundError, NotADirectoryError):
                return False
        if self.location.protocol == "memory":
            with _process_guard:
                return _process_locks.get(self._key()) is self.record
        current = self._get_remote()
        return current is not None and current.get("token") == self.record["token"]

    def moved_to(self, location: PathOrURL | Location) -> None:
        """The directory holding the lock was renamed to ``location`` (local only): follow it."""
        self.location = Location.of(location)
        self._file = None

    # -- the three kinds of location --------------------------------------------------------

    def _try_acquire(self) -> None:
        record = _new_record(self.purpose)
        if self.location.protocol == "memory":
            self._acquire_in_process(record)
        elif self.location.is_local:
            self._acquire_local(record)
        else:
            self._acquire_remote(record)
        self.record = record
        self._last_beat = record["heartbeat_unix"]

    def _acquire_local(self, record: dict[str, Any]) -> None:
        import fcntl
        path = self._path()
        if not self.location.local.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"{self.location}: no such store", str(path))
        try:
            _create_lock_file(self.location.local, self.name)
            fd = os.open(path, os.O_RDWR)
        except PermissionError as exc:
            raise StoreReadOnly(f"{self.location}: cannot take the {self.purpose} lock: "
                                f"{path} cannot be created ({exc.strerror})") from None
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise StoreReadOnly(f"{self.location}: cannot take the {self.purpose} lock: "
                                    "the file system is read-only") from None
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._locked(_read_record(fd)) from None
            if os.stat(path).st_ino != os.fstat(fd).st_ino:  # replaced while we opened it
                raise self._locked(None)
            previous = _read_record(fd)
            if _live_elsewhere(previous):
                raise self._locked(previous)
            _warn_takeover(self.location, self.purpose, previous)
            try:
                _write_record(fd, record)
            except PermissionError as exc:
                raise StoreReadOnly(f"{self.location}: cannot take the {self.purpose} lock: "
                                    f"{path} is not writable ({exc.strerror})") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _acquire_in_process(self, record: dict[str, Any]) -> None:
        with _process_guard:
            current = _process_locks.get(self._key())
            if current is not None:
                raise self._locked(current)
            _process_locks[self._key()] = record

    def _acquire_remote(self, record: dict[str, Any]) -> None:
        previous = self._get_remote()
        if previous is not None and not previous.get("released_unix") and _fresh(previous):
            raise self._locked(previous)
        _warn_takeover(self.location, self.purpose, previous)
        self._put_remote(record)
        time.sleep(_BEST_EFFORT_SETTLE)
        current = self._get_remote()
        if current is None or current.get("token") != record["token"]:
            raise self._locked(current)

    def _locked(self, holder: dict[str, Any] | None) -> StoreLocked:
        return StoreLocked(f"{self.location}: {_describe(holder, self.purpose)}; "
                           "wait for it to finish, or stop it", holder)

    def _path(self) -> str:
        if self._file is None:
            self._file = str(self.location.local / _key(self.name))
        return self._file

    def _key(self) -> str:
        return f"{self.location.url}/{_key(self.name)}"

    def _get_remote(self) -> dict[str, Any] | None:
        fs, root = self.location.filesystem()
        try:
            return _parse(fs.cat_file(f"{root}/{_key(self.name)}"))
        except FileNotFoundError:
            return None

    def _put_remote(self, record: dict[str, Any]) -> None:
        fs, root = self.location.filesystem()
        if not fs.exists(f"{root}/{LOCKS}/zarr.json"):
            fs.pipe_file(f"{root}/{LOCKS}/zarr.json", _metadata(None))
        fs.pipe_file(f"{root}/{_key(self.name)}", _metadata(record))


def read_holder(location: PathOrURL | Location, name: str = WRITER_LOCK) -> dict[str, Any] | None:
    """The record of lock ``name`` (whoever wrote it last, held or not), or None."""
    location = Location.of(location)
    if location.protocol == "memory":
        with _process_guard:
            return _process_locks.get(f"{location.url}/{_key(name)}")
    try:
        if location.is_local:
            return _parse((location.local / _key(name)).read_bytes())
        fs, root = location.filesystem()
        return _parse(fs.cat_file(f"{root}/{_key(name)}"))
    except (FileNotFoundError, NotADirectoryError):
        return None


# -- lock files and records ----------------------------------------------------------------

def _key(name: str) -> str:
    return f"{LOCKS}/{name}/zarr.json"


def _create_lock_file(directory: Path, name: str) -> None:
    """Create ``locks/zarr.json`` and ``locks/<name>/zarr.json`` if missing, each atomically
    with valid group metadata (written aside, then hard-linked into place)."""
    for key, content in ((f"{LOCKS}/zarr.json", _metadata(None)), (_key(name), _metadata(None))):
        target = directory / key
        if target.exists():
            continue
        target.parent.mkdir(exist_ok=True)
        aside = target.with_name(f".{uuid.uuid4().hex}.partial")
        aside.write_bytes(content)
        try:
            os.link(aside, target)
        except FileExistsError:
            pass  # another process made it first
        finally:
            aside.unlink()


def _metadata(record: dict[str, Any] | None) -> bytes:
    """Group metadata holding ``record``, padded (so that rewriting it in place is whole)."""
    data = json.dumps({**_GROUP, "attributes": {} if record is None else {"lock": record}})
    return data.encode().ljust(_RECORD_BYTES, b" ")


def _new_record(purpose: str) -> dict[str, Any]:
    now = time.time()
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "started_unix": now, "heartbeat_unix": now, "token": uuid.uuid4().hex}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.pwrite(fd, _metadata(record), 0)


def _read_record(fd: int) -> dict[str, Any] | None:
    return _parse(os.pread(fd, 64 * 1024, 0))


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        metadata = json.loads(data.decode() or "null")
    except (UnicodeDecodeError, ValueError):
        return None  # being written
    record = metadata.get("attributes", {}).get("lock") if isinstance(metadata, dict) else None
    return record if isinstance(record, dict) else None


def _fresh(record: dict[str, Any]) -> bool:
    return time.time() - float(record.get("heartbeat_unix", 0)) < STALE_AFTER


def _live_elsewhere(record: dict[str, Any] | None) -> bool:
    """We hold the OS lock; is the previous, unreleased holder possibly still alive on a host
    whose locks do not reach ours?"""
    if record is None or record.get("released_unix"):
        return False
    return record.get("host") != socket.gethostname() and _fresh(record)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _warn_takeover(location: Location, purpose: str, previous: dict[str, Any] | None) -> None:
    if previous is None or previous.get("released_unix"):
        return
    why = "which is gone"
    if previous.get("host") == socket.gethostname() and pid_alive(int(previous.get("pid", 0))):
        why = "which is alive but no longer holds it"
    elif previous.get("host") != socket.gethostname():
        age = time.time() - float(previous.get("heartbeat_unix", 0))
        why = f"whose last heartbeat is {age:.0f} s old"
    warnings.warn(f"{location}: taking over the {purpose} lock left by process "
                  f"{previous.get('pid')} on {previous.get('host')} (started "
                  f"{previous.get('started')}), {why}", RuntimeWarning, stacklevel=5)


def _describe(holder: dict[str, Any] | None, purpose: str) -> str:
    if holder is None:
        return f"the {purpose} lock is held by another process (its record is being written)"
    age = time.time() - float(holder.get("heartbeat_unix", holder.get("started_unix", 0)))
    return (f"the {purpose} lock is held by process {holder.get('pid')} on "
            f"{holder.get('host')} (a {holder.get('purpose', purpose)} started "
            f"{holder.get('started')}, last heartbeat {age:.0f} s ago)")
