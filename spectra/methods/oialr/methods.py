"""OIALR as methods of spectra.methods.build_method / ``spectra train``, with two presets.

``preset="ours"`` (the default) keeps our choices; ``preset="official"`` reproduces the official
code (github Helmholtz-AI-Energy/OIALR, ``src/madonna/models/oialr/`` with the CIFAR-10 config's
``stable_update_delay: 0``) point by point. Options given explicitly override the preset's.
Each difference, with its reason, is a row of the table in docs/oialr.md. The schedule (delay,
frequency, β) is a run setting, not a choice of the code, and is the same in both.

- ``oialr``: every candidate converts after a fixed ``delay`` (the paper's rule);
- ``oialr-stability``: each layer converts when its own basis stability has fallen below a
  fraction of its early-training level (spectra.methods.oialr.trigger; no delay).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from spectra.methods.oialr.controller import OIALR, FixedDelay, Trigger
from spectra.methods.oialr.trigger import StabilityTrigger
from spectra.methods.registry import Method, adamw_for

PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"keep_first": False, "keep_last": True, "keep_among": "all", "count": "steps",
             "cut_at_conversion": False, "phase_in": None, "moments": "transform",
             "freeze_bias": False},
    "official": {"keep_first": False, "keep_last": True, "keep_among": "eligible",
                 "count": "forwards", "cut_at_conversion": True, "phase_in": 0.1,
                 "moments": "official", "freeze_bias": True},
}
def preset_options(method: str, preset: str = "ours") -> dict[str, Any]:
    """The options ``method`` ("oialr" or "oialr-stability") runs with under ``preset`` where
    none is given explicitly (what ``spectra train --help`` lists)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; accepted: {sorted(PRESETS)}")
    return dict(PRESETS[preset])


_CONTROLLER_OPTIONS = tuple(name for name in inspect.signature(OIALR).parameters
                            if name not in ("model", "optimizer", "trigger", "frequency"))


def oialr_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                 preset: str = "ours", delay: int | None = None, frequency: int | None = None,
                 **options: Any) -> Method:
    """OIALR with the paper's fixed delay, trained by AdamW (spectra.methods.registry.adamw_for).

    delay: full-rank ticks before conversion (default ⌊total_steps / 3⌋); frequency: ticks
    between rank updates (default max(1, ⌊total_steps / 30⌋)): for the 30-epoch MNIST run,
    conversion at epoch 10 and a cut every epoch, the calibration of docs/architecture.md §7.
    Other options: those of spectra.methods.oialr.controller.OIALR.
    """
    delay = total_steps // 3 if delay is None else delay
    return _build("oialr", model, lr, weight_decay, FixedDelay(delay), total_steps, frequency,
                  preset, options, ("delay",))


def oialr_stability_method(model: nn.Module, *, lr: float, weight_decay: float,
                           total_steps: int, preset: str = "ours", frequency: int | None = None,
                           check_every: int = 50, k: int = 8, ratio: float = 0.03,
                           window: int = 3, **options: Any) -> Method:
    """OIALR where each layer converts when its measured basis stability has settled
    (spectra.methods.oialr.trigger.StabilityTrigger), trained by AdamW; no delay.

    check_every, k, ratio, window: see StabilityTrigger (the default ratio was chosen on the
    MLP study's tuning seeds, docs/oialr.md). Other options: as ``oialr``.
    """
    trigger = StabilityTrigger(check_every, k=k, ratio=ratio, window=window)
    return _build("oialr-stability", model, lr, weight_decay, trigger, total_steps, frequency,
                  preset, options, ("check_every", "k", "ratio", "window"))


def _build(name: str, model: nn.Module, lr: float, weight_decay: float, trigger: Trigger,
           total_steps: int, frequency: int | None, preset: str, options: dict[str, Any],
           accepted: tuple[str, ...]) -> Method:
    defaults = preset_options(name, preset)
    unknown = sorted(set(options) - set(_CONTROLLER_OPTIONS))
    if unknown:
        raise ValueError(f"method {name!r}: unknown option(s) {unknown}; accepted: "
                         f"{sorted(accepted + _CONTROLLER_OPTIONS + ('frequency', 'preset'))}")
    frequency = max(1, total_steps // 30) if frequency is None else frequency
    optimizer = adamw_for(model, lr, weight_decay)
    controller = OIALR(model, optimizer, trigger, frequency=frequency,
                       **{**defaults, **options})
    return Method(name, model, optimizer, controller)
