"""Low-rank training methods (InRank, OIALR) and the baselines they are compared with.

A method turns a model into a :class:`Method`: the optimizer to train with, and a callback run
after every optimizer step that may change the model (grow or cut ranks, convert layers) and
returns the scalars to record at that step (per-layer ranks, trainable parameters, ...).
The training loops (spectra.tasks.loops) and ``spectra train`` drive every method the same way, and
record its runs with the ordinary Recorder: low-rank layers expose their dense effective weight.

Registry: METHODS maps a name to "module:function"; the function is called as
``factory(model, lr=..., weight_decay=..., total_steps=..., **options) -> Method``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


AfterStep = Callable[[int], Mapping[str, float]]


@dataclass
class Method:
    """A model prepared for training by one method.

    model: the (possibly converted) model to train.
    optimizer: its optimizer (the method keeps it consistent when parameters change shape).
    after_step: called with the 1-based step after every optimizer step; returns scalars.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: AfterStep = field(default=lambda step: {})


METHODS: dict[str, str] = {
    "full": "spectra.methods.registry:full_method",
    "inrank": "spectra.methods.inrank.controller:inrank_method",
    "inrank-efficient": "spectra.methods.inrank.controller:inrank_efficient_method",
    "fixed-rank": "spectra.methods.inrank.controller:fixed_rank_method",
    "oialr": "spectra.methods.oialr.controller:oialr_method",
    "oialr-stability": "spectra.methods.oialr.controller:oialr_stability_method",
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
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Method("full", model, adamw_for(model, lr, weight_decay),
                  lambda step: {"trainable_params": float(params)})


def adamw_for(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays ≥2-D parameters (matrices, embeddings) but not biases or norms (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ], lr=lr)
