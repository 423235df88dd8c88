"""InRank (Zhao et al., arXiv 2306.11250): learn the cumulative update at a rank that grows.

    controller = to_inrank(model)                  # MLP Linear layers → InRankLinear, in place
    optimizer = controller.adamw(lr=2e-3, weight_decay=0.1)
    for step in range(1, steps + 1):
        loss = ...; optimizer.zero_grad(); loss.backward(); optimizer.step()
        scalars = controller(step)                 # {"rank.<layer>": r, "rank_fraction": ...}

The rule (docs/architecture.md §3 and §6, official ``in_rank_efficient.py``): every ``every`` optimizer steps after
``warmup``, take the singular values s of each layer's low-rank product U Vᵀ (the update W − W_0
for vanilla InRank, the whole weight for efficient InRank; all min(m, n) values, zeros
included) and set the rank to the first j in [r, min(r + b, max_rank − b)] with explained
ratio g(j) > α (``spectra.core.metrics.inrank_explained_ratio``, SVD by ``spectra.core.linalg``); if none
passes, to the top of that window. Ranks never shrink. The layer then trains r + b columns.

Differences from the official code, each on purpose:
- the schedule counts optimizer steps (``controller(step)``), not forward calls, so evaluation
  passes and gradient-accumulation micro-batches do not advance it;
- the window includes r + b (official: r + b − 1), so buffer b = 1 can grow and buffer 0 is
  fixed-rank training at the initial rank instead of a crash;
- new columns start with U = 0 (function unchanged) and V orthogonal to the current V; the
  official code activates preallocated Kaiming-random columns (function jumps);
- optimizer state is carried over exactly at growth and mapped through the SVD rotation at the
  stage-2 cut (spectra.methods.optim_state), where the official code slices rotated moments.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra.core.linalg import batched_svd
from spectra.core.metrics import inrank_explained_ratio
from spectra.methods.inrank.layers import InRankEfficientLinear, InRankLinear, LowRankLinear
from spectra.methods.modules import replace_module, trainable_count
from spectra.methods.optim_state import FRESH, remap_state
from spectra.methods.registry import Method

VARIANTS: dict[str, type[LowRankLinear]] = {"vanilla": InRankLinear,
                                            "efficient": InRankEfficientLinear}
RULE_INPUTS = ("product", "active", "increment")
DEFAULT_LAYERS = ("*mlp.*",)  # the feed-forward Linears of a transformer block (nanoGPT, GPT-2)


def grow_rank(s: Any, *, rank: int, buffer: int, alpha: float, max_rank: int) -> int:
    """InRank's rank update from the singular values ``s`` (min(m, n),) of the low-rank product.

    Returns the first j in [max(r, 1), top] with g(j) > alpha, where top = min(r + b,
    max_rank − b) (r = ``rank``, b = ``buffer``); ``top`` when none passes; ``rank`` when the
    window is empty (buffer 0, or the cap reached) or the product is zero (nothing learned).
    """
    top = min(rank + buffer, max_rank - buffer)
    s = np.asarray(s, dtype=np.float64)
    if top <= rank or not s.size or s[0] == 0:
        return rank
    g = inrank_explained_ratio(s)
    for j in range(max(rank, 1), top + 1):
        if g[j - 1] > alpha:  # NaN (a flat spectrum: every direction matters) never passes
            return j
    return top


class InRankController:
    """Grows the ranks of InRank layers every ``every`` optimizer steps after ``warmup``.

    A controller of spectra.methods.registry (``controller(step) -> scalars``, ``state_dict``,
    ``load_state_dict``): the state holds what a resumed run needs beyond the model's and the
    optimizer's own (the products the increment rule compares with, the stage, the random
    generator of new directions).

    Args:
        layers: module path → InRank layer (what ``to_inrank`` converted).
        alpha: explained-ratio threshold in (0, 1).
        every: evaluate the rule every this many optimizer steps. warmup: not before this step.
        search_steps: efficient InRank only: at this step, truncate every layer to its rank
            (stage 2) and stop growing. None: never (call ``truncate()`` yourself).
        rule_input: the singular values the rule sees: "product" (default, official: all
            min(m, n) values of U Vᵀ, the structural zeros beyond k included), "active" (only
            the k = r + b values the product can have) or "increment" (all values of the
            change of U Vᵀ since the previous evaluation: what is being learned now, where
            the youngest columns, the buffer, are not handicapped by their late start).
        fresh_moments: second moment of newly activated columns ("zero" or "row-mean", see
            spectra.methods.optim_state).
        model: the converted model (for the trainable-parameter count in the scalars).
        optimizer: whose state to keep consistent on rank changes (set it later with
            ``attach`` or ``adamw``).
        generator: the torch.Generator the layers draw new directions from (saved with the
            controller's state, so that a resumed run draws the same ones).
    """

    def __init__(self, layers: Mapping[str, LowRankLinear], *, alpha: float = 0.9,
                 every: int = 25, warmup: int = 100, search_steps: int | None = None,
                 rule_input: str = "product", fresh_moments: str = "zero",
                 model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 generator: torch.Generator | None = None):
        _check_rule(alpha, every, warmup, search_steps, rule_input, fresh_moments)
        if not layers:
            raise ValueError("layers is empty: nothing to control")
        self.layers = dict(layers)
        self.alpha, self.every, self.warmup = alpha, every, warmup
        self.search_steps = search_steps
        self.rule_input, self.fresh_moments = rule_input, fresh_moments
        self._previous: dict[str, torch.Tensor] = {}  # products at the last evaluation
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.searching = True  # stage 1 (grow) until truncate()

    def attach(self, optimizer: torch.optim.Optimizer) -> "InRankController":
        """Keep ``optimizer``'s state consistent when ranks change. Returns self."""
        self.optimizer = optimizer
        return self

    def factors(self) -> list[nn.Parameter]:
        """The U and V Parameters of every controlled layer."""
        return [p for layer in self.layers.values() for p in (layer.u, layer.v)]

    def adamw(self, lr: float, weight_decay: float, *, lr_scale: float = 1.0,
              factor_decay: float | None = None) -> torch.optim.AdamW:
        """AdamW over the whole model (``model`` must be set), attached to this controller.

        Groups: matrices outside the InRank layers (decayed), vectors (not decayed), and the
        factors U, V with learning rate ``lr · lr_scale`` (key "lr_scale", which
        spectra.tasks.loops's loops honour) and decay ``factor_decay`` (default ``weight_decay``).
        """
        if self.model is None:
            raise ValueError("adamw() needs the model: build the controller with to_inrank()")
        factors = self.factors()
        ids = {id(p) for p in factors}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        decay = weight_decay if factor_decay is None else factor_decay
        groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
                  {"params": factors, "weight_decay": decay, "lr": lr * lr_scale,
                   "lr_scale": lr_scale}]
        return self.attach(torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)).optimizer

    def __call__(self, step: int) -> dict[str, float]:
        """Call after optimizer step ``step`` (1-based). Applies the rule when due, switches
        to stage 2 at ``search_steps``; returns the scalars to record."""
        if self.searching and step > self.warmup and step % self.every == 0:
            self.evaluate()
        if self.searching and self.search_steps is not None and step >= self.search_steps:
            self.truncate()
        return self.scalars()

    def evaluate(self) -> dict[str, int]:
        """Apply the rule to every layer now; grow where it says so. Returns the new ranks."""
        by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name, layer in self.layers.items():
            by_shape[(layer.out_features, layer.in_features)].append(name)
        for names in by_shape.values():
            with torch.no_grad():
                stack = torch.stack([self._seen(n) for n in names])
            values = batched_svd(stack, compute="values").S.cpu().numpy()
            for name, s in zip(names, values):
                layer = self.layers[name]
                if self.rule_input == "active":
                    s = s[:layer.active_rank]
                rank = grow_rank(s, rank=layer.rank, buffer=layer.buffer, alpha=self.alpha,
                                 max_rank=layer.max_rank)
                if rank != layer.rank:
                    remap_state(self.optimizer, layer.grow(rank), fresh=self.fresh_moments)
        return {name: layer.rank for name, layer in self.layers.items()}

    def _seen(self, name: str) -> torch.Tensor:
        """The matrix whose singular values the rule reads for layer ``name``."""
        product = self.layers[name].product().detach()
        if self.rule_input != "increment":
            return product
        previous = self._previous.get(name)
        self._previous[name] = product
        return product if previous is None else product - previous

    def truncate(self) -> None:
        """Stage 2 of efficient InRank: every layer keeps its top ``rank`` directions, drops
        its buffer, and stops growing."""
        for layer in self.layers.values():
            remap_state(self.optimizer, layer.truncate(layer.rank))
        self.searching = False

    def scalars(self) -> dict[str, float]:
        """rank.<layer> (the rule's rank r), rank_fraction (trained columns Σ(r + b) over the
        layers' total rank Σ min(m, n)), trainable_params (of the model, if known)."""
        out = {f"rank.{name}": float(layer.rank) for name, layer in self.layers.items()}
        active = sum(layer.active_rank for layer in self.layers.values())
        out["rank_fraction"] = active / sum(layer.full_rank for layer in self.layers.values())
        if self.model is not None:
            out["trainable_params"] = float(trainable_count(self.model))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The products the increment rule compares with, the stage, and the generator of new
        directions (the layers' ranks and factors are in the model's state dict)."""
        return {"previous": {name: p.clone() for name, p in self._previous.items()},
                "searching": self.searching,
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (load the model's state dict too: it resizes the
        layers to the checkpoint's ranks, keeping the Parameter objects the optimizer holds)."""
        self._previous = {name: p.clone() for name, p in state["previous"].items()}
        self.searching = bool(state["searching"])
        if state["generator"] is not None:
            if self.generator is None:
                raise ValueError("the checkpoint has a generator state but this controller "
                                 "has no generator; build it with to_inrank()")
            self.generator.set_state(state["generator"])


def to_inrank(model: nn.Module, *, layers: str | Sequence[str] | None = None,
              variant: str = "vanilla", rank: int = 2, buffer: int = 16, alpha: float = 0.9,
              every: int = 25, warmup: int = 100, search_steps: int | None = None,
              rule_input: str = "product", fresh_moments: str = "zero",
              max_rank: int | None = None, init_scale: float = 1.0,
              new_columns: str = "orthogonal", seed: int = 0) -> InRankController:
    """Replace Linear layers of ``model`` (in place) by InRank layers; return their controller.

    Args:
        layers: shell patterns on module paths choosing which nn.Linear to convert. Default
            ``DEFAULT_LAYERS``, the MLP (feed-forward) layers as in the paper: for
            spectra.tasks.models.GPT, blocks.*.mlp.c_fc and blocks.*.mlp.c_proj. A pattern that
            matches only modules that are not nn.Linear is an error.
        variant: "vanilla" (W_0 + U Vᵀ) or "efficient" (U Vᵀ from scratch, two stages).
        rank, buffer, max_rank, init_scale, new_columns: per layer (see
            inrank_layers.LowRankLinear).
        alpha, every, warmup, search_steps, rule_input, fresh_moments: the controller's (see
            InRankController).
        seed: seeds the random directions of new columns.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; accepted: {sorted(VARIANTS)}")
    _check_rule(alpha, every, warmup, search_steps, rule_input, fresh_moments)
    generator = torch.Generator().manual_seed(seed)
    names = select_linears(model, DEFAULT_LAYERS if layers is None else layers)
    converted = {}
    for name in names:
        layer = VARIANTS[variant].from_linear(
            model.get_submodule(name), rank=rank, buffer=buffer, max_rank=max_rank,
            init_scale=init_scale, new_columns=new_columns, generator=generator)
        replace_module(model, name, layer)
        converted[name] = layer
    return InRankController(converted, alpha=alpha, every=every, warmup=warmup,
                            search_steps=search_steps, rule_input=rule_input,
                            fresh_moments=fresh_moments, model=model, generator=generator)


def _check_rule(alpha: Any, every: Any, warmup: Any, search_steps: Any, rule_input: Any,
                fresh_moments: Any) -> None:
    if rule_input not in RULE_INPUTS:
        raise ValueError(f"rule_input={rule_input!r}; accepted: {RULE_INPUTS}")
    if fresh_moments not in FRESH:
        raise ValueError(f"fresh_moments={fresh_moments!r}; accepted: {FRESH}")
    if not (isinstance(alpha, float | int) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha={alpha!r}; must be in (0, 1) (the paper uses 0.9)")
    for name, value, low in (("every", every, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}; must be an int >= {low}")
    if search_steps is not None and (not isinstance(search_steps, int) or search_steps < 1):
        raise ValueError(f"search_steps={search_steps!r}; must be a positive int or None")


def select_linears(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Paths of the nn.Linear modules of ``model`` matched by ``patterns`` (model order)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    modules = dict(model.named_modules())
    chosen = []
    for pattern in patterns:
        hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        linears = [name for name in hits if type(modules[name]) is nn.Linear]
        if not linears:
            found = ", ".join(f"{n!r} ({type(modules[n]).__name__})" for n in hits[:5])
            available = [n for n, m in modules.items() if type(m) is nn.Linear]
            raise ValueError(f"layers pattern {pattern!r} matches no nn.Linear"
                             + (f" (it matches {found})" if hits else "")
                             + f"; the model's nn.Linear layers: {available}")
        chosen += [name for name in linears if name not in chosen]
    return [name for name in modules if name in chosen]


# -- methods for spectra.methods.build_method / `spectra train` ----------------------------------

def inrank_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                  lr_scale: float = 1.0, factor_decay: float | None = None,
                  layers: str | Sequence[str] | None = None, **options: Any) -> Method:
    """Vanilla InRank (W_0 + U Vᵀ, rank grown by the rule). ``options``: those of to_inrank
    (rank, buffer, alpha, every, warmup, max_rank, init_scale, seed); ``layers`` may be a
    comma-separated string of patterns (``-O layers=layers.0,layers.1``)."""
    controller = to_inrank(model, layers=_patterns(layers), **options)
    return _method("inrank", controller, lr, weight_decay, lr_scale, factor_decay)


def inrank_efficient_method(model: nn.Module, *, lr: float, weight_decay: float,
                            total_steps: int, search_steps: int | None = None,
                            lr_scale: float = 1.0, factor_decay: float | None = None,
                            layers: str | Sequence[str] | None = None,
                            **options: Any) -> Method:
    """Efficient InRank (U Vᵀ from scratch): rank search for ``search_steps`` (default a third
    of ``total_steps``), then truncation to the found ranks and fixed-rank training."""
    search_steps = max(1, total_steps // 3) if search_steps is None else search_steps
    controller = to_inrank(model, layers=_patterns(layers), variant="efficient",
                           search_steps=search_steps, **options)
    return _method("inrank-efficient", controller, lr, weight_decay, lr_scale, factor_decay)


def fixed_rank_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                      rank: int = 32, variant: str = "vanilla", lr_scale: float = 1.0,
                      factor_decay: float | None = None,
                      layers: str | Sequence[str] | None = None, **options: Any) -> Method:
    """The InRank layers at a fixed rank (buffer 0, never grown): the rank cap without the
    rule. ``rank`` is capped at the smallest min(m, n) of the converted layers (``rank=100000``:
    no cap)."""
    converted = select_linears(model, _patterns(layers) or DEFAULT_LAYERS)
    smallest = min(min(model.get_submodule(n).weight.shape) for n in converted)
    controller = to_inrank(model, layers=converted, variant=variant, rank=min(rank, smallest),
                           buffer=0, **options)
    return _method("fixed-rank", controller, lr, weight_decay, lr_scale, factor_decay)


def _method(name: str, controller: InRankController, lr: float, weight_decay: float,
            lr_scale: float, factor_decay: float | None) -> Method:
    optimizer = controller.adamw(lr, weight_decay, lr_scale=lr_scale, factor_decay=factor_decay)
    return Method(name, controller.model, optimizer, controller)


def _patterns(layers: str | Sequence[str] | None) -> list[str] | None:
    if isinstance(layers, str):
        return [p.strip() for p in layers.split(",") if p.strip()]
    return None if layers is None else list(layers)
