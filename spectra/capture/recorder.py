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
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.capture import schedules
from spectra.capture.selection import RecordedMatrix, select_matrices, unwrap
from spectra.store import RunWriter, StoreError, create_run, is_run_store, resume_run

_STOP = object()


class Recorder:
    """Record W_0 and ΔW_t = W_t − W_0 of every weight matrix of ``model`` into ``path``.

    Args:
        model: any nn.Module (DDP, torch.compile and peft wrappers are looked through).
        path: the run store (a directory, created if new; an existing store is resumed).
        every: snapshot every ``every`` steps. Mutually exclusive with ``schedule``.
        schedule: "log" (dense early, sparse late), a schedules.Every/LogSpaced/Steps, or an
            explicit strictly increasing list of steps. Default: every step.
        optimizer: if given, its step post-hook drives the recorder (do not call ``step()``);
            pass scalars with ``log()``. Its hyperparameters go into the store's attrs.
        include, exclude, embeddings, trainable_only: which matrices (spectra.capture.rules;
            frozen parameters are skipped unless ``trainable_only=False``).
        start_step: the step the model is at now. New store: default 0. Resumed store: default
            the last committed step, checked against the stored weights.
        config: JSON-serialisable dict kept in attrs["spectra"]["config"].
        max_pending: snapshots that may wait for the writer before training blocks (memory bound:
            this many copies of the recorded weights).
        update_dtype: "float64" (exact reconstruction, default) or "float32" (half the bytes).
        compressors: zarr codecs for the matrices ("auto": lz4 + bitshuffle, None: raw).

    Under torch.distributed only rank 0 records; on other ranks every method is a no-op.
    """

    def __init__(self, model: nn.Module, path: str | Path, *, every: int | None = None,
                 schedule: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                 trainable_only: bool = True, start_step: int | None = None,
                 config: Mapping[str, Any] | None = None,
                 max_pending: int = 2, update_dtype: str = "float64", compressors: Any = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step={start_step!r}; must be a non-negative int")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r}; must be a positive int")
        self.model = unwrap(model)
        self.path = Path(path)
        self.schedule = schedules.make_schedule(every, schedule)
        self.optimizer = optimizer
        self.start_step = start_step
        self.config = dict(config or {})
        self.max_pending = max_pending
        self.update_dtype = update_dtype
        self.compressors = compressors
        self.active = _is_writer_rank()
        self.matrices: list[RecordedMatrix] = (
            select_matrices(self.model, include=include, exclude=exclude, embeddings=embeddings,
                            trainable_only=trainable_only)
            if self.active else [])
        self.global_step: int | None = None
        self._pending_scalars: dict[str, float] = {}
        self._last_snapshot: int | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._warnings: list[str] = []
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
        if not self.active or self._thread is not None:
            return self
        self._writer, snapshot_now = self._open_store()
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._write_loop, name="spectra-writer", daemon=True)
        self._thread.start()
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_post_hook(lambda *_: self._advance({}))
        if snapshot_now:
            self._snapshot({})
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Flush pending snapshots, stop the writer thread and remove the optimizer hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._emit_warnings()
        if raise_errors:
            self._raise_if_failed()

    # -- the training loop's calls -------------------------------------------------------------

    def step(self, **scalars: float) -> bool:
        """Mark one optimizer step; snapshot if the schedule says so. Returns True if it did.

        ``scalars`` (loss, lr, ...) are stored with the snapshot taken at this step, if any.
        """
        if not self.active:
            return False
        if self._hook is not None:
            raise RuntimeError("this Recorder is driven by its optimizer's step hook; "
                               "do not call step(), pass scalars with log()")
        return self._advance(scalars)

    def log(self, **scalars: float) -> None:
        """Attach scalars to the next snapshot (the way to pass them with ``optimizer=``)."""
        if self.active:
            self._pending_scalars.update({k: float(v) for k, v in scalars.items()})

    def snapshot(self, **scalars: float) -> bool:
        """Snapshot now, whatever the schedule (e.g. the final weights). False if already done."""
        if not self.active or self._last_snapshot == self.global_step:
            return False
        self._snapshot(scalars)
        return True

    def _advance(self, scalars: Mapping[str, float]) -> bool:
        self._require_started()
        self._raise_if_failed()
        self._emit_warnings()
        self.global_step += 1
        if self.global_step not in self.schedule:
            return False
        self._snapshot(scalars)
        return True

    def _snapshot(self, scalars: Mapping[str, float]) -> None:
        self._require_started()
        self._raise_if_failed()
        with torch.no_grad():
            weights = {m.spec.name: _host_copy(m.read()) for m in self.matrices}
        values = {**self._pending_scalars, **{k: float(v) for k, v in scalars.items()}}
        self._pending_scalars = {}
        self._last_snapshot = self.global_step
        item = (self.global_step, time.time() - self._writer.created, weights, values)
        self._queue.put(item)

    # -- the writer thread ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so the training thread never blocks on a dead writer
            step, elapsed, tensors, scalars = item
            try:
                weights = {name: t.numpy() for name, t in tensors.items()}
                bad = [name for name, w in weights.items() if not np.isfinite(w).all()]
                if bad:
                    self._warnings.append(f"non-finite weights at step {step} in {bad}; "
                                          "recorded as they are")
                self._writer.append(step, weights, scalars, time=elapsed)
            except BaseException as exc:  # re-raised in the training thread
                self._error = exc

    # -- opening the store ---------------------------------------------------------------------

    def _open_store(self) -> tuple[RunWriter, bool]:
        """Create or resume the store; returns it and whether to snapshot at start."""
        if is_run_store(self.path):
            return self._resume()
        if self.path.exists() and (self.path.is_file() or any(self.path.iterdir())):
            raise StoreError(f"{self.path}: exists and is not a spectra run store; refusing to "
                             "write into it (choose another path)")
        self.global_step = self.start_step or 0
        init = {m.spec.name: _host_copy(m.read()).numpy() for m in self.matrices}
        writer = create_run(self.path, [m.spec for m in self.matrices], init,
                            meta=self._meta(), update_dtype=self.update_dtype,
                            compressors=self.compressors)
        return writer, True

    def _resume(self) -> tuple[RunWriter, bool]:
        writer = resume_run(self.path)
        self._check_same_matrices(writer)
        last = writer.last_step
        if self.start_step is None:
            self.global_step = 0 if last is None else last
            if last is not None:
                self._check_weights_match(writer, last)
        elif last is not None and self.start_step <= last:
            raise StoreError(f"{self.path}: start_step={self.start_step} is not after the last "
                             f"committed step {last}; steps must strictly increase")
        else:
            self.global_step = self.start_step
        self._last_snapshot = last
        resumes = writer.meta.get("resumes", [])
        writer.update_meta(resumes=resumes + [{"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                               "step": self.global_step}])
        due = last is None or (self.global_step > last and self.global_step in self.schedule)
        return writer, due

    def _check_same_matrices(self, writer: RunWriter) -> None:
        ours = {m.spec.name: m.spec.shape for m in self.matrices}
        theirs = {name: writer.spec(name).shape for name in writer.params}
        for name in ours.keys() | theirs.keys():
            if name not in theirs:
                raise StoreError(f"{self.path}: cannot resume: the model has matrix {name!r} "
                                 f"{ours[name]} that the store does not record")
            if name not in ours:
                raise StoreError(f"{self.path}: cannot resume: the store records {name!r} "
                                 f"{theirs[name]} but the model (after include/exclude) has no "
                                 "such matrix")
            if ours[name] != theirs[name]:
                raise StoreError(f"{self.path}: cannot resume: {name!r} has shape {ours[name]} "
                                 f"in the model but {theirs[name]} in the store")

    def _check_weights_match(self, writer: RunWriter, last: int) -> None:
        """A resume without start_step must find the model at the store's last snapshot."""
        first = self.matrices[0]
        stored = writer.last_weights(first.spec.name)
        now = _host_copy(first.read()).numpy().astype(np.float64)
        if not np.allclose(now, stored, rtol=1e-6, atol=1e-7 * np.abs(stored).max()):
            raise StoreError(
                f"{self.path}: cannot resume: {first.spec.name!r} differs from the store's last "
                f"snapshot (step {last}); pass start_step=<the step your checkpoint was saved at>")

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
        if self._thread is None:
            raise RuntimeError("Recorder is not started: use `with Recorder(...) as rec:` "
                               "or call rec.start()")

    def _raise_if_failed(self) -> None:
        """Raise the writer's error; a failed writer stays failed (later snapshots are dropped)."""
        if self._error is not None:
            committed = self._writer.length if self._writer else 0
            raise RuntimeError(f"spectra: writing {self.path} failed ({self._error!r}); the store "
                               f"keeps its {committed} committed snapshots") from self._error

    def _emit_warnings(self) -> None:
        while self._warnings:
            warnings.warn(f"{self.path}: {self._warnings.pop(0)}", RuntimeWarning, stacklevel=3)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy, float32 (float64 kept), detached from the live parameter."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(device="cpu", dtype=dtype, copy=True)


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
