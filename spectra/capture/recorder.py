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

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.capture import schedules
from spectra.capture.host import host_copy
from spectra.capture.opening import open_store
from spectra.capture.selection import RecordedMatrix, select_matrices, unwrap
from spectra.capture.writer_thread import BackgroundWriter
from spectra.store import RunWriter


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
        opened = open_store(self.path, self.matrices, start_step=self.start_step,
                            schedule=self.schedule, meta=self._meta(),
                            update_dtype=self.update_dtype, compressors=self.compressors)
        self._writer, self.global_step = opened.writer, opened.global_step
        self._last_snapshot = opened.last_snapshot
        self._background = BackgroundWriter(self._writer, self.max_pending)
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_post_hook(lambda *_: self._advance({}))
        if opened.snapshot_now:
            self._snapshot({})
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Flush pending snapshots, stop the writer thread and remove the optimizer hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._background is not None:
            self._background.stop()
            self._emit_warnings()
            self._error = self._error or self._background.error
            self._background = None
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
            weights = {m.spec.name: host_copy(m.read()) for m in self.matrices}
        values = {**self._pending_scalars, **{k: float(v) for k, v in scalars.items()}}
        self._pending_scalars = {}
        self._last_snapshot = self.global_step
        self._background.put(self.global_step, time.time() - self._writer.created, weights, values)

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
            raise RuntimeError(f"spectra: writing {self.path} failed ({self._error!r}); the store "
                               f"keeps its {committed} committed snapshots") from self._error

    def _emit_warnings(self) -> None:
        messages = self._background.warnings if self._background is not None else []
        while messages:
            warnings.warn(f"{self.path}: {messages.pop(0)}", RuntimeWarning, stacklevel=3)

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
