"""Record a Lightning run: ``Trainer(callbacks=[SpectraCallback("runs/x.zarr", every=10)])``.

Needs ``lightning`` (or the standalone ``pytorch_lightning``; the callback subclasses whichever
is installed, ``lightning`` first).

- Steps are ``trainer.global_step``: optimizer steps, so ``accumulate_grad_batches=N`` gives one
  step per N batches; W_0 is the weights when training starts (step 0, or the checkpoint's step
  when resuming with ``ckpt_path=``, which continues the store; a checkpoint older than the
  store's last snapshot needs ``rewind=True``, which cuts the store back to its step).
- ``loss`` stored with the snapshot of step k is the mean training loss of the batches that
  produced step k (what ``training_step`` returned), on rank 0; ``lr`` the first param group's
  learning rate that step used.
- The final weights are snapshotted when training ends; an exception closes the store (what was
  queued is written) and is re-raised by Lightning.
- DDP: rank 0 writes, the other ranks do nothing. FSDP2 / ModelParallelStrategy (DTensor
  parameters): every rank takes part in each snapshot (see the Recorder).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from spectra.integrations.clock import TrainerClock, trainer_optimizer

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl


class SpectraCallback(pl.Callback):
    """A Lightning callback recording the LightningModule's weight matrices into ``path``.

    ``recorder_kwargs`` are the Recorder's (``every``, ``schedule``, ``include``, ``exclude``,
    ``embeddings``, ``trainable_only``, ``config``, ``rewind``, ``overwrite``, ...); ``path`` is
    the store (a path or an fsspec URL).
    """

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        super().__init__()
        self._clock = TrainerClock(path, recorder_kwargs, "lightning")
        self.path = self._clock.path
        self._losses: list[torch.Tensor] = []
        self._lr: float | None = None

    @property
    def recorder(self):
        """The Recorder while training runs, else None."""
        return self._clock.recorder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses, self._lr = [], None
        notes = {"accumulate_grad_batches": trainer.accumulate_grad_batches,
                 "precision": str(trainer.precision), "world_size": trainer.world_size,
                 "automatic_optimization": pl_module.automatic_optimization}
        if trainer.optimizers:
            notes["optimizer"] = trainer_optimizer(trainer.optimizers[0])
        self._clock.begin(pl_module, trainer.global_step, notes)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss(outputs)
        if loss is not None:
            self._losses.append(loss)
        step = trainer.global_step
        if step <= (self._clock.step or 0):
            return  # inside an accumulation window: no optimizer step yet
        scalars = {}
        if self._losses:
            # automatic optimization hands back each batch's loss / the window's length
            total = torch.stack(self._losses).sum()
            scalars["loss"] = total if pl_module.automatic_optimization else total / len(self._losses)
        if self._lr is not None:
            scalars["lr"] = self._lr
        self._clock.advance(step, **scalars)
        self._losses, self._lr = [], None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._clock.abort()


def _loss(outputs: Any) -> torch.Tensor | None:
    """The loss in what training_step returned (a tensor, or a mapping with "loss"), detached."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach().reshape(()).float()
    return None
