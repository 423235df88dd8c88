"""Optimizers as the Recorder sees them: the torch optimizer inside a trainer's wrapper, and
what the store keeps about it."""

from __future__ import annotations

from typing import Any

import torch


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer``: accelerate's AcceleratedOptimizer (``.optimizer``)
    and Lightning's LightningOptimizer (``._optimizer``) are looked through, at any depth.

    Raises TypeError, naming the object, if no torch optimizer with step hooks is inside.
    """
    found = optimizer
    for _ in range(16):  # wrappers nest a few levels at most
        inner = getattr(found, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(found, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is found:
            break
        found = inner
    if not (isinstance(found, torch.optim.Optimizer)
            and hasattr(found, "_optimizer_step_post_hooks")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a wrapper holding one "
                        f"(accelerate, Lightning); got {type(optimizer).__name__}")
    return found


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Its class name and the hyperparameters of its first param group (JSON-ready values are
    the caller's concern)."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {"name": type(optimizer).__name__, **group}
