"""Record a HuggingFace Trainer run: ``Trainer(..., callbacks=[SpectraCallback("runs/x.zarr",
every=10)])``. Needs ``transformers``.

- Steps are ``state.global_step``: optimizer steps, so ``gradient_accumulation_steps=N`` gives
  one step per N micro-batches; W_0 is the weights when training starts (step 0, or the
  checkpoint's step with ``resume_from_checkpoint=``, which continues the store; a checkpoint
  older than the store's last snapshot needs ``rewind=True``, which cuts the store back to it).
- ``loss`` stored with the snapshot of step k is the training loss of step k as the Trainer
  computes it for its logs (its micro-batches' losses normalised as the Trainer does), read
  from the model's ``loss`` output on rank 0; absent when the loss is computed outside the model
  (``compute_loss_func``, label smoothing). ``lr`` is the learning rate step k used.
- The final weights are snapshotted when training ends. transformers has no exception callback:
  if ``train()`` raises, the store is closed (what was queued is written) when the process
  exits, when ``train()`` is called again, or by ``callback.close()``.
- PeftModel, DDP and torch.compile wrappers are looked through; DDP: rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from spectra.integrations.clock import TrainerClock, trainer_optimizer


class SpectraCallback(TrainerCallback):
    """A TrainerCallback recording the model's weight matrices into ``path``.

    ``recorder_kwargs`` are the Recorder's (``every``, ``schedule``, ``include``, ``exclude``,
    ``embeddings``, ``trainable_only``, ``config``, ``rewind``, ``overwrite``, ...); ``path`` is
    the store (a path or an fsspec URL).
    """

    def __init__(self, path: str | Path, **recorder_kwargs: Any):
        self._clock = TrainerClock(path, recorder_kwargs, "transformers")
        self.path = self._clock.path
        self._losses: list[torch.Tensor] = []
        self._sum_losses = False  # True when the model's loss is already a share of the step's
        self._loss_scale = 1  # the Trainer's own factor for token-averaged losses across ranks
        self._lr: float | None = None
        self._hook = None

    @property
    def recorder(self):
        """The Recorder while training runs, else None."""
        return self._clock.recorder

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        notes = {"gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "world_size": args.world_size, "bf16": args.bf16, "fp16": args.fp16}
        if optimizer is not None:
            notes["optimizer"] = trainer_optimizer(optimizer)
        self.close()
        self._losses, self._lr = [], None
        self._clock.begin(model, state.global_step, notes)
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)
        self._loss_scale = args.world_size if args.average_tokens_across_devices else 1

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        scalars = {}
        if self._losses:
            total = torch.stack(self._losses).sum()
            scalars["loss"] = (total * self._loss_scale if self._sum_losses
                               else total / len(self._losses))
        if self._lr is not None:
            scalars["lr"] = self._lr
        self._clock.advance(state.global_step, **scalars)
        self._losses, self._lr = [], None

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        self._clock.end()

    def close(self) -> None:
        """Close the store after ``train()`` raised (also done at exit and by the next train())."""
        self._remove_hook()
        self._clock.abort()

    def _keep_loss(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: keep the loss of each training micro-batch."""
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()).float())
            # with num_items_in_batch the model divides by the whole step's token count, so
            # the step's loss is the sum over micro-batches (the Trainer's own normalisation)
            self._sum_losses = kwargs.get("num_items_in_batch") is not None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
