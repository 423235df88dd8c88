"""Low-rank training methods (InRank, OIALR) and the baselines they are compared with.

A method turns a model into a :class:`Method`: the optimizer to train with, and a
:class:`Controller` called after every optimizer step that may change the model (grow or cut
ranks, convert layers) and returns the scalars to record at that step (per-layer ranks,
trainable parameters, ...). The training loops (spectra.tasks.loops) and ``spectra train`` drive
every method the same way, and record its runs with the ordinary Recorder: low-rank layers
expose their dense effective weight.

A checkpoint of a method is ``method.state_dict()``; ``method.load_state_dict(state)`` on a
method built the same way (same model class and options) resumes it exactly: the controller is
restored first (it rebuilds the structure it changed: converted layers), then the model (which
resizes low-rank layers to the checkpoint's ranks), then the optimizer.

Registry: METHODS maps a name to "module:function"; the function is called as
``factory(model, lr=..., weight_decay=..., total_steps=..., **options) -> Method``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from spectra.methods.modules import trainable_count


class Controller(Protocol):
    """What a method runs after every optimizer step (InRank's and OIALR's controllers, OIALR's
    triggers, the full-rank baseline's count)."""

    def __call__(self, step: int) -> dict[str, float]:
        """Act after optimizer step ``step`` (1-based); return the scalars to record."""

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs beyond the model's and the optimizer's state dicts."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s result (before the model's and the optimizer's)."""


@dataclass
class Method:
    """A model prepared for training by one method.

    model: the (possibly converted) model to train.
    optimizer: its optimizer (the method keeps it consistent when parameters change shape).
    after_step: the Controller, called with the 1-based step after every optimizer step.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Controller

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the controller's, the model's and the optimizer's state dicts."""
        return {"controller": self.after_step.state_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``'s result: controller, then model, then optimizer."""
        self.after_step.load_state_dict(state["controller"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


METHODS: dict[str, str] = {
    "full": "spectra.methods.registry:full_method",
    "inrank": "spectra.methods.inrank.methods:inrank_method",
    "inrank-efficient": "spectra.methods.inrank.methods:inrank_efficient_method",
    "fixed-rank": "spectra.methods.inrank.methods:fixed_rank_method",
    "oialr": "spectra.methods.oialr.methods:oialr_method",
    "oialr-stability": "spectra.methods.oialr.methods:oialr_stability_method",
}


def build_method(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                 total_steps: int, **options: Any) -> Method:
    """Prepare ``model`` for training with method ``name`` (one of METHODS)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}; accepted: {sorted(METHODS)}")
    module, function = METHODS[name].split(":")
    factory = getattr(importlib.import_module(module), function)
    return factory(model, lr=lr, weight_decay=weight_decay, total_steps=total_steps, **options)


def full_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                **options: Any) -> Method:
    """Full-rank training with AdamW: the baseline."""
    if options:
        raise ValueError(f"method 'full' takes no options; got {sorted(options)}")
    return Method("full", model, adamw_for(model, lr, weight_decay), TrainableCount(model))


class TrainableCount:
    """The full-rank baseline's controller: records the trainable-parameter count, changes
    nothing, has no state."""

    def __init__(self, model: nn.Module):
        self.count = float(trainable_count(model))

    def __call__(self, step: int) -> dict[str, float]:
        return {"trainable_params": self.count}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def adamw_for(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays ≥2-D parameters (matrices, embeddings) but not biases or norms (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=lr)
