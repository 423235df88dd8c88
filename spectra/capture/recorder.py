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
            pass scalars with ``log()``. Its hyperparameters go into the store's attrs. A
            trainer's wrapper (accelerate's AcceleratedOptimizer, Lightning's
            LightningOptimizer) is looked through: the torch optimizer inside is hooked, so
            only steps it really takes count (not accumulation micro-steps, not steps AMP's
            GradScaler skipped).
        include, exclude, embeddings, trainable_only: which matrices (spectra.capture.rules;
            frozen parameters are skipped unless ``trainable_only=False``).
        start_step: the step the model is at now. New store: default 0. Resumed store: default
            the last committed step, checked against the stored weights.
        config: JSON-serialisable dict kept in attrs["spectra"]["config"].
        max_pending: snapshots that may wait for the writer before training blocks (memory bound:
            this many copies of the recorded weights).
        update_dtype: "float64" (exact reconstruction, default) or "float32" (half the bytes).
        compressors: zarr codecs for the matrices ("auto": lz4 + bitshuffle, None: raw).
        timeout: sharded models only: seconds a rank waits for the others at a snapshot before
            raising.

    Under torch.distributed rank 0 writes; see the module docstring for sharded models.
    """

    def __init__(self, model: nn.Module, path: str | Path, *, every: int | None = None,
                 schedule: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                 trainable_only: bool = True, start_step: int | None = None,
                 config: Mapping[str, Any] | None = None,
                 max_pending: int = 2, update_dtype: str = "float64", compressors: Any = "auto",
                 timeout: float = 600.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step={start_step!r}; must be a non-negative int")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r}; must be a positive int")
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"timeout={timeout!r}; must be a positive number of seconds")
        self.model = unwrap(model)
        self.path = Path(path)
        self.schedule = schedules.make_schedule(every, schedule)
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        self.start_step = start_step
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
        self._pending_scalars: dict[str, float] = {}
        self._last_snapshot: int | None = None
        self._background: BackgroundWriter | None = None
        self._gather: ShardGather | None = None
        self._started = False
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

        If anything fails, no thread or hook is left behind, nor a store this call created.
        """
        if self._started or not (self.active or self.sharded):
            return self
        made = _made_by_start(self.path) if self.active else None
        try:
            if self.sharded:
                self._gather = ShardGather(self.matrices, self.timeout)
            weights = self._collect(self.start_step or 0)
            opened = self._open(weights)
            self.global_step, self._last_snapshot = opened.global_step, opened.last_snapshot
            if self.active:
                self._writer = opened.writer
                self._background = BackgroundWriter(self._writer, self.max_pending)
            if self.optimizer is not None:
                self._hook = self.optimizer.register_step_post_hook(lambda *_: self._advance({}))
            self._started = True
            if opened.snapshot_now:
                self._snapshot({}, collected=(weights,))
        except BaseException:
            self._undo_start(made)
            raise
        return self

    def _open(self, weights: Mapping[str, torch.Tensor] | None) -> Opened:
        """open_store on the writer rank; under sharding its outcome (or its failure) is shared
        with every rank, which gets an Opened without a writer."""
        opened, failure = None, None
        if self.active:
            try:
                opened = open_store(self.path, self.matrices, weights, start_step=self.start_step,
                                    schedule=self.schedule, meta=self._meta(),
                                    update_dtype=self.update_dtype, compressors=self.compressors)
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
        """After a failed start(): remove the hook, stop the thread, and remove a store this
        start() made (``made``: "new" path, or a directory that was "empty")."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._background is not None:
            self._background.stop()
            self._background = None
        self._started, self._writer, self._gather = False, None, None
        if made is not None and self.path.is_dir():
            shutil.rmtree(self.path)
            if made == "empty":
                self.path.mkdir()

    def close(self, raise_errors: bool = True) -> None:
        """Flush pending snapshots, stop the writer thread and remove the optimizer hook."""
        self._started = False
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
        if not (self.active or self.sharded):
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
        if not (self.active or self.sharded) or self._last_snapshot == self.global_step:
            return False
        self._snapshot(scalars)
        return True

    def _advance(self, scalars: Mapping[str, float]) -> bool:
        self._require_started()
        if self._gather is None:  # sharded: raised at the next snapshot, on every rank at once
            self._raise_if_failed()
        self._emit_warnings()
        self.global_step += 1
        if self.global_step not in self.schedule:
            return False
        self._snapshot(scalars)
        return True

    def _snapshot(self, scalars: Mapping[str, float], collected: tuple | None = None) -> None:
        """Queue the snapshot of the current step (``collected``: (weights,) already collected
        by this rank for this step)."""
        self._require_started()
        if self._gather is None:
            self._raise_if_failed()
        else:  # every rank acts on the same answer, even if the writer fails meanwhile
            failed = self._gather.share(self._failure(), f"the snapshot at step {self.global_step}")
            if failed is not None and self.active:
                self._raise_if_failed()
            if failed is not None:
                raise RuntimeError(f"spectra: the writer rank failed ({failed}); every rank "
                                   "stops recording")
        (weights,) = collected or (self._collect(self.global_step),)
        self._last_snapshot = self.global_step
        if not self.active:
            return
        values = {**self._pending_scalars, **{k: float(v) for k, v in scalars.items()}}
        self._pending_scalars = {}
        self._background.put(self.global_step, time.time() - self._writer.created, weights, values)

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
            raise RuntimeError(f"spectra: writing {self.path} failed ({self._error!r}); the store "
                               f"keeps its {committed} committed snapshots") from self._error

    def _emit_warnings(self) -> None:
        messages = self._background.warnings if self._background is not None else []
        while messages:
            warnings.warn(f"{self.path}: {messages.pop(0)}", RuntimeWarning, stacklevel=3)


def _made_by_start(path: Path) -> str | None:
    """What start() will make at ``path``: "new" (nothing there), "empty" (an empty directory
    it will fill), or None (an existing store, or something it will refuse)."""
    if not path.exists():
        return "new"
    return "empty" if path.is_dir() and not any(path.iterdir()) else None


def _is_writer_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == WRITER


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
