"""A Recorder driven by a trainer's own step counter: the part the Lightning and HF Trainer
callbacks share.

Steps are the trainer's global step (optimizer steps: a gradient-accumulation window counts
once; a step that AMP's GradScaler skipped still counts, as the trainer counts it, so store
steps equal the trainer's checkpoint steps). The scalars handed to :meth:`TrainerClock.advance`
at step k (the loss of the micro-batches that produced step k, the learning rate it used) are
stored with the snapshot of step k, if one is due.
"""

from __future__ import annotations

import atexit
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.capture.optimizers import describe_optimizer, unwrap_optimizer
from spectra.capture.recorder import Recorder
from spectra.store import Location, is_run_store, open_run

_SET_BY_CLOCK = ("optimizer", "start_step")


class TrainerClock:
    """One Recorder for one training run of a trainer (a callback holds one).

    Args:
        path: the run store (a path or an fsspec URL).
        recorder_kwargs: the Recorder's keyword arguments (every, schedule, include, ...);
            ``optimizer`` and ``start_step`` are set from the trainer and refused here.
            ``rewind=True``: a trainer resumed from a checkpoint older than the store's last
            snapshot cuts the store back to that checkpoint's step; ``overwrite=True``: the
            store is started over at the trainer's step.
        integration: the trainer's name, kept in the store's config.
    """

    def __init__(self, path: str | Path, recorder_kwargs: Mapping[str, Any], integration: str):
        taken = [k for k in _SET_BY_CLOCK if k in recorder_kwargs]
        if taken:
            raise TypeError(f"SpectraCallback sets {taken} from the trainer (its global step "
                            "drives the recorder); do not pass them")
        try:
            inspect.signature(Recorder).bind(nn.Module(), path, **recorder_kwargs)
        except TypeError as exc:
            raise TypeError(f"SpectraCallback: {exc} (it takes the Recorder's keyword "
                            "arguments)") from None
        self.location = Location.of(path)
        self.path: Path | str = self.location.local or self.location.url
        self.kwargs = {k: v for k, v in recorder_kwargs.items() if k != "config"}
        self.config = dict(recorder_kwargs.get("config") or {})
        self.integration = integration
        self.recorder: Recorder | None = None
        self.step: int | None = None
        self._last_scalars: Mapping[str, float | torch.Tensor] = {}

    def begin(self, model: nn.Module, step: int, trainer_config: Mapping[str, Any]) -> None:
        """Open (or resume) the store with ``model`` at the trainer's ``step``.

        ``trainer_config`` (accumulation, precision, optimizer, ...) is kept in the store's
        config, under the user's own ``config`` entries.
        """
        self.abort()  # a previous run that raised without telling its callbacks
        config = {"integration": self.integration, **trainer_config, **self.config}
        start_step = step if self.kwargs.get("overwrite") else _start_step(self.location, step)
        kwargs = self.kwargs if start_step is not None else {**self.kwargs, "rewind": False}
        self.recorder = Recorder(model, self.location, start_step=start_step, config=config,
                                 **kwargs).start()
        self.step = step
        self._last_scalars = {}
        atexit.register(self.abort)

    def advance(self, step: int, **scalars: float | torch.Tensor) -> None:
        """The trainer is now at ``step``: mark the steps since the last call, ``scalars`` with
        the last of them. Tensor scalars are read (a device sync) only for a snapshot."""
        if self.recorder is None or step <= self.step:
            return
        for _ in range(step - self.step - 1):  # several optimizer steps in one batch
            self.recorder.step()
        self.step = step
        self._last_scalars = scalars
        self.recorder.step(**(_floats(scalars) if step in self.recorder.schedule else {}))

    def end(self) -> None:
        """Snapshot the final weights (if not just taken), with the last step's scalars, and
        close the store."""
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        atexit.unregister(self.abort)
        try:
            recorder.snapshot(**_floats(self._last_scalars))
        finally:
            recorder.close()

    def abort(self) -> None:
        """Close after an exception: flush what is queued, raise nothing."""
        if self.recorder is None:
            return
        recorder, self.recorder = self.recorder, None
        atexit.unregister(self.abort)
        recorder.close(raise_errors=False)


def trainer_optimizer(optimizer: Any) -> dict[str, Any]:
    """What the store keeps about a trainer's (wrapped) optimizer."""
    return describe_optimizer(unwrap_optimizer(optimizer))


def _floats(scalars: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in scalars.items()}


def _start_step(location: Location, step: int) -> int | None:
    """The Recorder's start_step for a trainer at ``step``: None (resume, checked against the
    stored weights; nothing to rewind) when the store's last snapshot is at ``step``, else
    ``step``."""
    if is_run_store(location):
        run = open_run(location)
        if len(run) and int(run.steps[-1]) == step:
            return None
    return step
