"""The Recorder's background writer: a thread that writes queued snapshots to the store and
commits them.

The training thread only copies the weights and puts them in a bounded queue; differencing,
compression and disk writes happen here. Written snapshots are committed together (group
commit): when the oldest uncommitted one is :data:`COMMIT_EVERY` seconds old, and at the end.
A commit rewrites the small per-snapshot arrays (``steps``, ``time``, …) and the root
attributes, which costs far more than a small model's matrix rows (docs/store.md); committing
twice a second keeps that off the per-snapshot cost, and a process killed at any instant loses
at most the last ``COMMIT_EVERY`` seconds of snapshots, never a committed one.

A writer error is kept and re-raised in the training thread at its next call; the thread keeps
draining the queue so training never blocks on it. While idle the thread refreshes the writer
lock's heartbeat and checks that the store is still there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping

import numpy as np
import torch

from spectra.store import RunWriter

COMMIT_EVERY = 0.5  # seconds: the longest a written snapshot waits for its commit
_IDLE = 5.0  # seconds between heartbeats while no snapshot arrives
_STOP = object()


class BackgroundWriter:
    """Writes (step, elapsed, weights, scalars) items to ``writer`` on a daemon thread."""

    def __init__(self, writer: RunWriter, max_pending: int):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._write_loop, name="spectra-writer", daemon=True)
        self._oldest: float | None = None  # when the oldest uncommitted snapshot was written
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self._thread.start()

    def put(self, step: int, elapsed: float, weights: Mapping[str, torch.Tensor],
            scalars: Mapping[str, float]) -> None:
        """Queue one snapshot; blocks while ``max_pending`` snapshots are waiting."""
        self._queue.put((step, elapsed, weights, scalars))

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        """Write and commit what is queued, close the writer (releasing the store), end."""
        self._queue.put(_STOP)
        self._thread.join()

    def _write_loop(self) -> None:
        while True:
            item = self._next()
            if item is _STOP:
                self._close()
                return
            if self.error is not None:
                continue  # keep draining so the training thread never blocks on a dead writer
            try:
                if item is not None:
                    self._write(*item)
                if self._oldest is not None and time.monotonic() - self._oldest >= COMMIT_EVERY:
                    self.writer.commit()
                    self._oldest = None
                    self.writer.keep_alive()
                elif item is None:  # idle: the heartbeat, and is the store still there
                    self.writer.keep_alive()
            except BaseException as exc:  # re-raised in the training thread
                self._salvage()
                self.error = exc

    def _next(self) -> object:
        """The next item, or None when a commit falls due (or a heartbeat) first."""
        wait = _IDLE if self._oldest is None else COMMIT_EVERY - (time.monotonic() - self._oldest)
        try:
            return self._queue.get(timeout=max(wait, 0.0))
        except queue.Empty:
            return None

    def _write(self, step: int, elapsed: float, tensors: Mapping[str, torch.Tensor],
               scalars: Mapping[str, float]) -> None:
        weights = {name: t.numpy() for name, t in tensors.items()}
        bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
        if bad:
            self.warnings.append(f"non-finite weights at step {step} in {bad}; recorded as "
                                 "they are")
        self.writer.write(step, weights, scalars, time=elapsed)
        if self._oldest is None:
            self._oldest = time.monotonic()

    def _salvage(self) -> None:
        """After an error, commit the snapshots already written whole, if the store lets us."""
        try:
            self.writer.commit()
        except BaseException:
            pass  # the error itself is what the training thread will see

    def _close(self) -> None:
        """Commit what was written (even after an error: those snapshots are whole) and
        release the store."""
        try:
            self.writer.close()
        except BaseException as exc:
            self.writer.abandon()
            self.error = self.error or exc
