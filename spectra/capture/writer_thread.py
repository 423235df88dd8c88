"""The Recorder's background writer: a thread that commits queued snapshots to the store.

The training thread only copies the weights and puts them in a bounded queue; differencing,
compression and disk writes happen here. A writer error is kept and re-raised in the training
thread at its next call; the thread keeps draining the queue so training never blocks on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping

import numpy as np
import torch

from spectra.store import RunWriter

_STOP = object()


class BackgroundWriter:
    """Commits (step, elapsed, weights, scalars) items to ``writer`` on a daemon thread."""

    def __init__(self, writer: RunWriter, max_pending: int):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._write_loop, name="spectra-writer", daemon=True)
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
        """Write what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # keep draining so the training thread never blocks on a dead writer
            step, elapsed, tensors, scalars = item
            try:
                weights = {name: t.numpy() for name, t in tensors.items()}
                bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
                if bad:
                    self.warnings.append(f"non-finite weights at step {step} in {bad}; "
                                         "recorded as they are")
                self.writer.append(step, weights, scalars, time=elapsed)
            except BaseException as exc:  # re-raised in the training thread
                self.error = exc
