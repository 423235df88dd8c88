"""InRank as methods of spectra.methods.build_method / ``spectra train``, with two presets.

``preset="ours"`` (the default) is the configuration our study chose; ``preset="official"``
reproduces the official code (github jiaweizzhao/InRank, ``in_rank_efficient.py`` and its
GPT-2 configs) point by point. Options given explicitly override the preset's, so
``-O preset=official -O lr_scale=4`` is the official method with one of our choices. Each
difference, with its reason, is a row of the table in docs/inrank.md.

The official code ships efficient InRank only; ``inrank -O preset=official`` applies its rule,
schedule and factors to the vanilla layer W_0 + U Vᵀ the paper describes. The stage-2 switch
(``search_steps``, default a third of training) is a run setting, not a choice of the code
(its GPT-2 config searches for 130 of ~22,000 optimizer steps), and is the same in both.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from spectra.methods.inrank.controller import DEFAULT_LAYERS, InRankController, select_linears, \
    to_inrank
from spectra.methods.registry import Method

PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"rank": 2, "buffer": 8, "alpha": 0.9, "every": 25, "warmup": 100,
             "count": "steps", "window": "inclusive", "max_rank": None,
             "new_columns": "orthogonal", "rule_input": "increment", "fresh_moments": "zero",
             "moments": "transform", "lr_scale": 4.0},
    "official": {"rank": 2, "buffer": "official", "alpha": 0.9, "every": 25, "warmup": 200,
                 "count": "forwards", "window": "official", "max_rank": "half",
                 "new_columns": "kaiming", "rule_input": "product", "fresh_moments": "zero",
                 "moments": "official", "lr_scale": 1.0},
}
EFFICIENT_OURS = {"buffer": 16}  # the efficient variant's own choice (docs/inrank.md)


def inrank_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                  preset: str = "ours", layers: str | Sequence[str] | None = None,
                  **options: Any) -> Method:
    """Vanilla InRank (W_0 + U Vᵀ, rank grown by the rule). ``options``: those of to_inrank and
    ``lr_scale`` / ``factor_decay`` (the factors' learning-rate multiple and weight decay);
    ``layers`` may be a comma-separated string of patterns (``-O layers=layers.0,layers.1``)."""
    settings = _settings("inrank", preset, options)
    lr_scale, decay = settings.pop("lr_scale"), settings.pop("factor_decay", None)
    controller = to_inrank(model, layers=_patterns(layers), **settings)
    return _method("inrank", controller, lr, weight_decay, lr_scale, decay)


def inrank_efficient_method(model: nn.Module, *, lr: float, weight_decay: float,
                            total_steps: int, preset: str = "ours",
                            search_steps: int | None = None,
                            layers: str | Sequence[str] | None = None,
                            **options: Any) -> Method:
    """Efficient InRank (U Vᵀ from scratch): rank search for ``search_steps`` (default a third
    of ``total_steps``), then truncation to the found ranks and fixed-rank training."""
    settings = _settings("inrank-efficient", preset, options)
    lr_scale, decay = settings.pop("lr_scale"), settings.pop("factor_decay", None)
    search_steps = max(1, total_steps // 3) if search_steps is None else search_steps
    controller = to_inrank(model, layers=_patterns(layers), variant="efficient",
                           search_steps=search_steps, **settings)
    return _method("inrank-efficient", controller, lr, weight_decay, lr_scale, decay)


def fixed_rank_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                      rank: int = 32, variant: str = "vanilla", lr_scale: float = 4.0,
                      factor_decay: float | None = None,
                      layers: str | Sequence[str] | None = None, **options: Any) -> Method:
    """The InRank layers at a fixed rank (buffer 0, never grown): the rank cap without the
    rule, our factor learning rate. ``rank`` is capped at the smallest min(m, n) of the
    converted layers (``rank=100000``: no cap)."""
    converted = select_linears(model, _patterns(layers) or DEFAULT_LAYERS)
    smallest = min(min(model.get_submodule(n).weight.shape) for n in converted)
    controller = to_inrank(model, layers=converted, variant=variant, rank=min(rank, smallest),
                           buffer=0, **options)
    return _method("fixed-rank", controller, lr, weight_decay, lr_scale, factor_decay)


_OPTIONS = {*inspect.signature(to_inrank).parameters, "lr_scale", "factor_decay"} - \
    {"model", "layers", "variant", "search_steps"}


def preset_options(method: str, preset: str = "ours") -> dict[str, Any]:
    """The options ``method`` ("inrank" or "inrank-efficient") runs with under ``preset``
    where none is given explicitly (what ``spectra train --help`` lists)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; accepted: {sorted(PRESETS)}")
    own = EFFICIENT_OURS if method == "inrank-efficient" and preset == "ours" else {}
    return {**PRESETS[preset], **own}


def _settings(method: str, preset: str, options: dict[str, Any]) -> dict[str, Any]:
    """The preset's options updated by ``options`` (unknown names are a clear error)."""
    defaults = preset_options(method, preset)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown InRank option(s) {unknown}; accepted: "
                         f"{sorted(_OPTIONS | {'layers', 'preset'})}")
    return {**defaults, **options}


def _method(name: str, controller: InRankController, lr: float, weight_decay: float,
            lr_scale: float, factor_decay: float | None) -> Method:
    optimizer = controller.adamw(lr, weight_decay, lr_scale=lr_scale, factor_decay=factor_decay)
    return Method(name, controller.model, optimizer, controller)


def _patterns(layers: str | Sequence[str] | None) -> list[str] | None:
    if isinstance(layers, str):
        return [p.strip() for p in layers.split(",") if p.strip()]
    return None if layers is None else list(layers)
