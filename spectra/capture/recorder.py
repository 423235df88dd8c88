"""The Recorder: snapshots a model's weight matrices into a run store while it trains.

    with spectra.Recorder(model, "runs/gpt.zarr", every=10) as rec:
        for batch in loader:
            loss = ...; loss.backward(); opt.step(); opt.zero_grad()
            rec.step(loss=loss.item())

Step semantics: the snapshot taken when recording begins is step ``start_step`` (0 for a new
store); the k-th call of ``rec.step()`` (or, with ``optimizer=``, the k-th optimizer step) marks
step k. The training thread only copies the weights (one memcpy per matrix); differencing,
compression and disk writes happen on a background thread fed by a bounded queue, so training
blocks only when the writer is ``max_pending`` snapshots behind. A writer error is re-raised in
the training thread at its next call; everything committed before it stays readable.

Scalars. Step k is the loop iteration that ends with the k-th step. The snapshot at step k
stores, for each scalar, the last value that belongs to step k (NaN if none):
- values passed to ``rec.step(**scalars)`` (or ``rec.snapshot(**scalars)``) belong to the step
  it marks (the current one);
- ``rec.log(**scalars)`` may be called before or after ``opt.step()``; the Recorder learns which
  from each name's first value in this session: a name first logged before the first step is
  logged *before* its step (its values belong to the step that ends next); any other name is
  logged *after* it (its values belong to the step just ended, ``rec.global_step``).
  ``rec.log(..., step=k)`` says it explicitly (k = the step just ended or the next one).
A snapshot is handed to the writer when its step is over (at the next step, ``snapshot()`` or
``close()``), so a value logged after the last ``opt.step()`` is kept. Values logged at a step
without a snapshot are not stored.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.capture import schedules
from spectra.capture.host import host_copy
from spectra.capture.opening import open_store
from spectra.capture.selection import RecordedMatrix, select_matrices
from spectra.capture.writer_thread import BackgroundWriter
from spectra.store import Location, RunWriter


class RecordingError(RuntimeError):
    """Writing the store failed; the store keeps what was committed before (``committed``)."""

    def __init__(self, message: str, committed: int):
        super().__init__(message)
        self.committed = committed


@dataclass
class _Open:
    """A snapshot whose step is not over yet: it still takes that step's scalars."""

    step: int
    elapsed: float
    weights: dict[str, torch.Tensor]
    scalars: dict[str, float] = field(default_factory=dict)


class Recorder:
    """Record W_0 and ΔW_t = W_t − W_0 of every weight matrix of ``model`` into ``path``.

    Args:
        model: any nn.Module (a DistributedDataParallel wrapper is unwrapped).
        path: the run store: a directory, or an fsspec URL (``memory://…``, ``s3://…``);
            created if new; an existing store is resumed.
        every: snapshot every ``every`` steps. Mutually exclusive with ``schedule``.
        schedule: "log" (dense early, sparse late), a schedules.Every/LogSpaced/Steps, or an
            explicit strictly increasing list of steps. Default: every step.
        optimizer: if given, its step post-hook drives the recorder (do not call ``step()``);
            pass scalars with ``log()``. Its hyperparameters go into the store's attrs.
        include, exclude, embeddings: which matrices (see spectra.capture.selection).
        start_step: the step the model is at now. New store: default 0. Resumed store: default
            the last committed step, checked against the stored weights (every matrix).
        rewind: with ``start_step`` at or before the store's last step (a checkpoint older than
            the store), cut the store back to its snapshots at steps ≤ ``start_step`` and
            continue from there; recorded in attrs["spectra"]["rewinds"].
        overwrite: replace an existing run store at ``path`` with a new one (never a path that
            is not a run store).
        config: JSON-serialisable dict kept in attrs["spectra"]["config"].
        max_pending: snapshots that may wait in the queue before training blocks. Memory: at
            most about (max_pending + 4) copies of the recorded weights, float32, while the
            writer falls behind (measured in docs/store.md).
        update_dtype: "float64" (exact reconstruction, default) or "float32" (half the bytes).
        compressors: zarr codecs for the matrices ("auto": lz4 + bitshuffle, None: raw); a
            crc32c checksum is always added.

    The store is locked for the Recorder's life: a second writer fails at once with an error
    naming this one. Under torch.distributed only rank 0 records; on other ranks every method
    is a no-op.
    """

    def __init__(self, model: nn.Module, path: str | Path, *, every: int | None = None,
                 schedule: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                 start_step: int | None = None, rewind: bool = False, overwrite: bool = False,
                 config: Mapping[str, Any] | None = None, max_pending: int = 2,
                 update_dtype: str = "float64", compressors: Any = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step={start_step!r}; must be a non-negative int")
        if rewind and start_step is None:
            raise ValueError("rewind=True needs start_step=<the step your checkpoint was saved at>")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r}; must be a positive int")
        self.model = getattr(model, "module", model) if _is_ddp(model) else model
        self.location = Location.of(path)
        self.path: Path | str = self.location.local or self.location.url
        self.schedule = schedules.make_schedule(every, schedule)
        self.optimizer = optimizer
        self.start_step = start_step
        self.rewind = rewind
        self.overwrite = overwrite
        self.config = dict(config or {})
        self.max_pending = max_pending
        self.update_dtype = update_dtype
        self.compressors = compressors
        self.active = _is_writer_rank()
        self.matrices: list[RecordedMatrix] = (
            select_matrices(self.model, include=include, exclude=exclude, embeddings=embeddings)
            if self.active else [])
        self.global_step: int | None = None
        self._open: _Open | None = None
        self._before: dict[str, float] = {}  # values of before-step names, for the next step
        self._styles: dict[str, str] = {}  # scalar name → "before" | "after"
        self._stepped = False  # a step has ended in this session
        self._last_snapshot: int | None = None
        self._background: BackgroundWriter | None = None
        self._error: BaseException | None = None
        self._hook = None
        self._writer: RunWriter | None = None

    @property
    def params(self) -> list[str]:
        """Names of the recorded matrices, in model order."""
        return [m.spec.name for m in self.matrices]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)

    def start(self) -> "Recorder":
        """Open (or resume) the store, take the first snapshot, start the writer thread."""
        if not self.active or self._background is not None:
            return self
        opened = open_store(self.location, self.matrices, start_step=self.start_step,
                            rewind=self.rewind, overwrite=self.overwrite, schedule=self.schedule,
                            meta=self._meta(), update_dtype=self.update_dtype,
                            compressors=self.compressors)
        self._writer, self.global_step = opened.writer, opened.global_step
        self._last_snapshot = opened.last_snapshot
        self._background = BackgroundWriter(self._writer, self.max_pending)
        try:
            if self.optimizer is not None:
                self._hook = self.optimizer.register_step_post_hook(lambda *_: self._advance({}))
            if opened.snapshot_now:
                self._capture({})
        except BaseException:
            self.close(raise_errors=False)  # no thread, hook or held lock left behind
            raise
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Hand over the last snapshot, write and commit everything, release the store, stop
        the writer thread and remove the optimizer hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._background is not None:
            self._seal()
            self._background.stop()
            self._emit_warnings()
            self._error = self._error or self._background.error
            self._background = None
        if raise_errors:
            self._raise_if_failed()

    # -- the training loop's calls -------------------------------------------------------------

    def step(self, **scalars: float) -> bool:
        """Mark one optimizer step; snapshot if the schedule says so. Returns True if it did.

        ``scalars`` (loss, lr, ...) belong to this step: stored with its snapshot, if any.
        """
        if not self.active:
            return False
        if self._hook is not None:
            raise RuntimeError("this Recorder is driven by its optimizer's step hook; "
                               "do not call step(), pass scalars with log()")
        return self._advance(scalars)

    def log(self, *, step: int | None = None, **scalars: float) -> None:
        """Record scalars for the step they belong to (module docstring, "Scalars"), whichever
        side of ``opt.step()`` this is called from; ``step=`` names that step explicitly (the
        step just ended, ``rec.global_step``, or the next one)."""
        if not self.active:
            return
        self._require_started()
        for name, value in scalars.items():
            target = step if step is not None else self._default_step(name)
            if target == self.global_step + 1:
                self._before[name] = float(value)
            elif target == self.global_step:
                if self._open is not None and self._open.step == target:
                    self._open.scalars[name] = float(value)
            else:
                raise ValueError(f"log(step={target}): values can only go to the step just "
                                 f"ended ({self.global_step}) or the next one "
                                 f"({self.global_step + 1})")

    def snapshot(self, **scalars: float) -> bool:
        """Snapshot now, whatever the schedule (e.g. the final weights). False if already done
        (``scalars`` still go to this step's snapshot)."""
        if not self.active:
            return False
        self._require_started()
        if self._last_snapshot == self.global_step:
            if self._open is not None and self._open.step == self.global_step:
                self._open.scalars.update({k: float(v) for k, v in scalars.items()})
            return False
        self._capture(scalars)
        return True

    def _advance(self, scalars: Mapping[str, float]) -> bool:
        self._require_started()
        self._raise_if_failed()
        self._emit_warnings()
        self._seal()  # the previous step is over
        self.global_step += 1
        self._stepped = True
        values, self._before = {**self._before, **scalars}, {}
        if self.global_step not in self.schedule:
            return False
        self._capture(values)
        return True

    def _default_step(self, name: str) -> int:
        style = self._styles.setdefault(name, "after" if self._stepped else "before")
        return self.global_step + 1 if style == "before" else self.global_step

    def _capture(self, scalars: Mapping[str, float]) -> None:
        """Copy the weights now; the snapshot stays open for this step's scalars."""
        self._raise_if_failed()
        self._seal()
        with torch.no_grad():
            weights = {m.spec.name: host_copy(m.read()) for m in self.matrices}
        self._open = _Open(self.global_step, time.time() - self._writer.created, weights,
                           {k: float(v) for k, v in scalars.items()})
        self._last_snapshot = self.global_step

    def _seal(self) -> None:
        """Hand the open snapshot to the writer: its step is over."""
        if self._open is not None:
            snapshot, self._open = self._open, None
            self._background.put(snapshot.step, snapshot.elapsed, snapshot.weights,
                                 snapshot.scalars)

    def _meta(self) -> dict[str, Any]:
        meta = {"model": type(self.model).__name__, "model_repr": str(self.model)[:20000],
                "schedule": schedules.describe(self.schedule), "config": _jsonable(self.config),
                "torch_version": torch.__version__}
        if self.optimizer is not None:
            group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            meta["optimizer"] = {"name": type(self.optimizer).__name__, **_jsonable(group)}
        return meta

    # -- errors ----------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._background is None:
            raise RuntimeError("Recorder is not started: use `with Recorder(...) as rec:` "
                               "or call rec.start()")

    def _raise_if_failed(self) -> None:
        """Raise the writer's error; a failed writer stays failed (later snapshots are dropped)."""
        if self._background is not None and self._background.error is not None:
            self._error = self._background.error
        if self._error is not None:
            committed = self._writer.length if self._writer else 0
            raise RecordingError(f"{self.location}: recording failed: {_describe(self._error)}; "
                                 f"the store keeps its {committed} committed snapshots",
                                 committed) from self._error

    def _emit_warnings(self) -> None:
        messages = self._background.warnings if self._background is not None else []
        while messages:
            warnings.warn(f"{self.path}: {messages.pop(0)}", RuntimeWarning, stacklevel=3)

def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel)


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _describe(error: BaseException) -> str:
    """An error in words: an OSError's message and file, else the error itself."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error) or type(error).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return repr(value)
