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

Distributed training. Under DDP (or any torch.distributed job whose parameters are plain
tensors) rank 0 records and the Recorder is a no-op on the other ranks. Under FSDP2 and any
model whose parameters are DTensors, every rank must create, start and step its Recorder alike:
at each snapshot the ranks send their shards to rank 0, which writes the full matrices
(spectra.capture.sharded); a rank that fails or stops makes the others raise within
``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import shutil
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
from spectra.capture.opening import Opened, open_store
from spectra.capture.optimizers import describe_optimizer, unwrap_optimizer
from spectra.capture.selection import RecordedMatrix, select_matrices, unwrap
from spectra.capture.sharded import WRITER, ShardGather, is_sharded
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
        model: any nn.Module (DDP, torch.compile and peft wrappers are looked through).
        path: the run store: a directory, or an fsspec URL (``memory://…``, ``s3://…``);
            created if new; an existing store is resumed.
        every: snapshot every ``every`` steps. Mutually exclusive with ``schedule``.
        schedule: "log" (dense early, sparse late), a schedules.Every/LogSpaced/Steps, or an
            explicit strictly increasing list of steps. Default: every step.
        optimizer: if given, its step post-hook drives the recorder (do not call ``step()``);
            pass scalars with ``log()``. Its hyperparameters go into the store's attrs. A
            trainer's wrapper (accelerate's AcceleratedOptimizer, Lightning's
            LightningOptimizer) is looked through: the torch optimizer inside is hooked, so
            only steps it really takes count (not accumulation micro-steps, not steps AMP's
            GradScaler skipped).
        include, exclude, embeddings, trainable_only: which matrices (spectra.capture.rules;
            frozen parameters are skipped unless ``trainable_only=False``).
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
        timeout: sharded models only: seconds a rank waits for the others at a snapshot before
            raising.

    The store is locked for the Recorder's life: a second writer fails at once with an error
    naming this one. Under torch.distributed rank 0 writes; see the module docstring for
    sharded models.
    """

    def __init__(self, model: nn.Module, path: str | Path, *, every: int | None = None,
                 schedule: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                 trainable_only: bool = True, start_step: int | None = None,
                 rewind: bool = False, overwrite: bool = False,
                 config: Mapping[str, Any] | None = None, max_pending: int = 2,
                 update_dtype: str = "float64", compressors: Any = "auto",
                 timeout: float = 600.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step={start_step!r}; must be a non-negative int")
        if rewind and start_step is None:
            raise ValueError("rewind=True needs start_step=<the step your checkpoint was saved at>")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r}; must be a positive int")
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"timeout={timeout!r}; must be a positive number of seconds")
        self.model = unwrap(model)
        self.location = Location.of(path)
        self.path: Path | str = self.location.local or self.location.url
        self.schedule = schedules.make_schedule(every, schedule)
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        self.start_step = start_step
        self.rewind = rewind
        self.overwrite = overwrite
        self.config = dict(config or {})
        self.max_pending = max_pending
        self.update_dtype = update_dtype
        self.compressors = compressors
        self.timeout = float(timeout)
        self.active = _is_writer_rank()  # this rank writes the store
        self.sharded = is_sharded(self.model)  # every rank takes part in each snapshot
        self.matrices: list[RecordedMatrix] = (
            select_matrices(self.model, include=include, exclude=exclude, embeddings=embeddings,
                            trainable_only=trainable_only)
            if self.active or self.sharded else [])
        self.global_step: int | None = None
        self._open: _Open | None = None
        self._before: dict[str, float] = {}  # values of before-step names, for the next step
        self._styles: dict[str, str] = {}  # scalar name → "before" | "after"
        self._stepped = False  # a step has ended in this session
        self._last_snapshot: int | None = None
        self._background: BackgroundWriter | None = None
        self._gather: ShardGather | None = None
        self._started = False
        self._created = False  # start() created the store (removed again if start() fails)
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
        """Open (or resume) the store, take the first snapshot, start the writer thread.

        If anything fails, no thread or hook is left behind, nor a store this call created, and
        the store's lock is released. An existing store is left as it was, but for the record
        of this resume (attrs["spectra"]["resumes"]) when the failure comes after the opening.
        """
        if self._started or not (self.active or self.sharded):
            return self
        made = _made_by_start(self.location) if self.active else None
        try:
            if self.optimizer is not None:  # first: an optimizer that refuses changes nothing
                self._hook = self.optimizer.register_step_post_hook(lambda *_: self._advance({}))
            if self.sharded:
                self._gather = ShardGather(self.matrices, self.timeout)
            weights = self._collect(self.start_step or 0)
            opened = self._open_store(weights)
            self._created = opened.created
            self.global_step, self._last_snapshot = opened.global_step, opened.last_snapshot
            if self.active:
                self._writer = opened.writer
                self._background = BackgroundWriter(self._writer, self.max_pending)
            self._started = True
            if opened.snapshot_now:
                self._capture({}, collected=(weights,))
        except BaseException:
            self._undo_start(made)
            raise
        return self

    def _open_store(self, weights: Mapping[str, torch.Tensor] | None) -> Opened:
        """open_store on the writer rank; under sharding its outcome (or its failure) is shared
        with every rank, which gets an Opened without a writer."""
        opened, failure = None, None
        if self.active:
            try:
                opened = open_store(self.location, self.matrices, weights,
                                    start_step=self.start_step, rewind=self.rewind,
                                    overwrite=self.overwrite, schedule=self.schedule,
                                    meta=self._meta(), update_dtype=self.update_dtype,
                                    compressors=self.compressors)
            except Exception as exc:
                if self._gather is None:
                    raise
                failure = exc  # shared first, so that no rank waits for a writer that gave up
        if self._gather is None:
            return opened
        shared = self._gather.share(
            None if opened is None else (opened.global_step, opened.last_snapshot,
                                         opened.snapshot_now), "opening the store")
        if failure is not None:
            raise failure
        if shared is None:
            raise RuntimeError(f"spectra: rank {WRITER} could not open {self.path} (its error "
                               "is raised there); this rank stops recording too")
        return opened or Opened(None, *shared)

    def _undo_start(self, made: str | None) -> None:
        """After a failed start(): remove the hook, drop the first snapshot unwritten, stop the
        thread, release the store's lock, and remove a store this start() created (``made``:
        "new" location, or a directory that was "empty")."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._open = None
        if self._background is not None:
            self._background.stop()  # closes the writer: releases the lock
            self._background = None
        elif self._writer is not None:
            self._writer.abandon()
        if made is not None and self._created:
            _remove(self.location, keep_empty_dir=made == "empty")
        self._started, self._writer, self._gather, self._created = False, None, None, False

    def close(self, raise_errors: bool = True) -> None:
        """Hand over the last snapshot, write and commit everything, release the store, stop
        the writer thread and remove the optimizer hook."""
        self._started = False
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
        if not (self.active or self.sharded):
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
        if not (self.active or self.sharded):
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
        if self._gather is None:  # sharded: raised at the next snapshot, on every rank at once
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

    def _capture(self, scalars: Mapping[str, float], collected: tuple | None = None) -> None:
        """Copy the weights of the current step now (``collected``: (weights,) this rank
        already collected for it); the snapshot stays open for this step's scalars."""
        self._require_started()
        self._check_writer()
        self._seal()
        (weights,) = collected or (self._collect(self.global_step),)
        self._last_snapshot = self.global_step
        if not self.active:
            return
        self._open = _Open(self.global_step, time.time() - self._writer.created, weights,
                           {k: float(v) for k, v in scalars.items()})

    def _check_writer(self) -> None:
        """Raise if the writer failed; under sharding every rank acts on the writer rank's
        answer, even if the writer fails meanwhile."""
        if self._gather is None:
            self._raise_if_failed()
            return
        failed = self._gather.share(self._failure(), f"the snapshot at step {self.global_step}")
        if failed is not None and self.active:
            self._raise_if_failed()
        if failed is not None:
            raise RuntimeError(f"spectra: the writer rank failed ({failed}); every rank "
                               "stops recording")

    def _seal(self) -> None:
        """Hand the open snapshot to the writer: its step is over."""
        if self._open is not None:
            snapshot, self._open = self._open, None
            self._background.put(snapshot.step, snapshot.elapsed, snapshot.weights,
                                 snapshot.scalars)

    def _collect(self, step: int) -> dict[str, torch.Tensor] | None:
        """Host copies of the matrices now, on the writer rank (None on the others)."""
        if self._gather is not None:
            return self._gather.collect(self.matrices, step)
        with torch.no_grad():
            return {m.spec.name: host_copy(m.read()) for m in self.matrices}

    def _meta(self) -> dict[str, Any]:
        meta = {"model": type(self.model).__name__, "model_repr": str(self.model)[:20000],
                "schedule": schedules.describe(self.schedule), "config": _jsonable(self.config),
                "torch_version": torch.__version__}
        if self.optimizer is not None:
            meta["optimizer"] = _jsonable(describe_optimizer(self.optimizer))
        return meta

    # -- errors ----------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("Recorder is not started: use `with Recorder(...) as rec:` "
                               "or call rec.start()")

    def _failure(self) -> str | None:
        """The writer's error as text (None if it is fine, or on other ranks)."""
        if self._background is not None and self._background.error is not None:
            self._error = self._background.error
        return None if self._error is None else repr(self._error)

    def _raise_if_failed(self) -> None:
        """Raise the writer's error; a failed writer stays failed (later snapshots are dropped)."""
        if self._failure() is not None:
            committed = self._writer.length if self._writer else 0
            raise RecordingError(f"{self.location}: recording failed: {_describe(self._error)}; "
                                 f"the store keeps its {committed} committed snapshots",
                                 committed) from self._error

    def _emit_warnings(self) -> None:
        messages = self._background.warnings if self._background is not None else []
        while messages:
            warnings.warn(f"{self.path}: {messages.pop(0)}", RuntimeWarning, stacklevel=3)


def _made_by_start(location: Location) -> str | None:
    """What start() will make at ``location``: "new" (nothing there), "empty" (an empty
    directory it will fill), or None (an existing store, or something it will refuse)."""
    if not location.is_empty_or_absent():
        return None
    return "empty" if location.is_local and location.local.is_dir() else "new"


def _remove(location: Location, keep_empty_dir: bool) -> None:
    """Remove the store at ``location`` (leaving an empty directory if asked)."""
    if location.is_local:
        shutil.rmtree(location.local, ignore_errors=True)
        if keep_empty_dir:
            location.local.mkdir()
        return
    fs, path = location.filesystem()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == WRITER


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
