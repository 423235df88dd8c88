"""InRank (Zhao et al., arXiv 2306.11250): learn the cumulative update at a rank that grows.

    controller = to_inrank(model)                  # MLP Linear layers → InRankLinear, in place
    optimizer = controller.adamw(lr=2e-3, weight_decay=0.1)
    for step in range(1, steps + 1):
        loss = ...; optimizer.zero_grad(); loss.backward(); optimizer.step()
        scalars = controller(step)                 # {"rank.<layer>": r, "rank_fraction": ...}

Every ``every`` ticks after ``warmup``, the rule (spectra.methods.inrank.rule.grow_rank) reads the
singular values of each layer's low-rank product U Vᵀ (the update W − W_0 for vanilla InRank,
the whole weight for efficient InRank; SVDs batched over same-shape layers by
spectra.core.linalg) and grows its rank; ranks never shrink. A tick is an optimizer step
(``count="steps"``, ours) or a forward call of the layer, evaluation passes included
(``count="forwards"``, the official code's, spectra.methods.clock). Efficient InRank switches to
stage 2 at optimizer step ``search_steps``: each layer keeps its top r directions and trains
at that fixed rank.

Every choice where we differ from the official code is an option of :func:`to_inrank`; the
presets of spectra.methods.inrank.methods name both sets (docs/inrank.md has the table).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spectra.core.linalg import batched_svd
from spectra.methods.clock import ForwardClock, check_count
from spectra.methods.inrank.layers import InRankEfficientLinear, InRankLinear, LowRankLinear
from spectra.methods.inrank.rule import WINDOWS, grow_rank
from spectra.methods.modules import replace_module, trainable_count
from spectra.methods.optim_state import FRESH, remap_state

VARIANTS: dict[str, type[LowRankLinear]] = {"vanilla": InRankLinear,
                                            "efficient": InRankEfficientLinear}
RULE_INPUTS = ("product", "active", "increment")
MOMENTS = ("transform", "official")
DEFAULT_LAYERS = ("*mlp.*",)  # the feed-forward Linears of a transformer block (nanoGPT, GPT-2)
OFFICIAL_BUFFER = (100, 384)  # buffer_modes 100 at GPT-2 small's ceiling ⌊768/2⌋ = 384


class InRankController:
    """Grows the ranks of InRank layers every ``every`` ticks after ``warmup`` (module docstring).

    A controller of spectra.methods.registry (``controller(step) -> scalars``, ``state_dict``,
    ``load_state_dict``): the state holds what a resumed run needs beyond the model's and the
    optimizer's own (the products the increment rule compares with, the stage, the forward
    counts, the random generator of new directions).

    Args:
        layers: module path → InRank layer (what ``to_inrank`` converted).
        alpha: explained-ratio threshold in (0, 1).
        every: evaluate the rule every this many ticks. warmup: not before tick ``warmup`` + 1.
        search_steps: efficient InRank only: at this optimizer step, truncate every layer to
            its rank (stage 2) and stop growing. None: never (call ``truncate()`` yourself).
        rule_input: the singular values the rule sees: "product" (the official input: all
            min(m, n) values of U Vᵀ, the structural zeros beyond k included), "active" (only
            the k = r + b values the product can have) or "increment" (all values of the
            change of U Vᵀ since the layer's previous evaluation: what is being learned now,
            where the youngest columns, the buffer, are not handicapped by their late start).
        fresh_moments: second moment of newly created columns ("zero" or "row-mean", see
            spectra.methods.optim_state).
        moments: the optimizer state at the stage-2 cut: "transform" (through the SVD
            rotation, spectra.methods.optim_state) or "official" (the first r columns of the
            unrotated moments).
        window: the rule's search window, "inclusive" or "official" (spectra.methods.inrank.rule).
        count: what a tick is, "steps" or "forwards" (module docstring).
        model: the converted model (for the trainable-parameter count in the scalars).
        optimizer: whose state to keep consistent on rank changes (set it later with
            ``attach`` or ``adamw``).
        generator: the torch.Generator the layers draw new directions from (saved with the
            controller's state, so that a resumed run draws the same ones).
    """

    def __init__(self, layers: Mapping[str, LowRankLinear], *, alpha: float = 0.9,
                 every: int = 25, warmup: int = 100, search_steps: int | None = None,
                 rule_input: str = "product", fresh_moments: str = "zero",
                 moments: str = "transform", window: str = "inclusive", count: str = "steps",
                 model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 generator: torch.Generator | None = None):
        _check_rule(alpha, every, warmup, search_steps, rule_input, fresh_moments, moments,
                    window, count)
        if not layers:
            raise ValueError("layers is empty: nothing to control")
        self.layers = dict(layers)
        self.alpha, self.every, self.warmup = alpha, every, warmup
        self.search_steps = search_steps
        self.rule_input, self.fresh_moments, self.moments = rule_input, fresh_moments, moments
        self.window, self.count = window, count
        self._previous: dict[str, torch.Tensor] = {}  # products at the last evaluation
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.searching = True  # stage 1 (grow) until truncate()
        self.clocks = {} if count == "steps" else {
            name: ForwardClock(layer, lambda tick, name=name: self._tick(tick, [name]),
                               training_only=False)
            for name, layer in self.layers.items()}

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
        """Call after optimizer step ``step`` (1-based). Applies the rule when due (counting
        steps), switches to stage 2 at ``search_steps``; returns the scalars to record."""
        if self.count == "steps":
            self._tick(step, list(self.layers))
        if self.searching and self.search_steps is not None and step >= self.search_steps:
            self.truncate()
        return self.scalars()

    def _tick(self, tick: int, names: list[str]) -> None:
        if self.searching and tick > self.warmup and tick % self.every == 0:
            self.evaluate(names)

    def evaluate(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Apply the rule now to the layers ``names`` (default all); grow where it says so.
        Returns the ranks of all layers."""
        by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
        for name in self.layers if names is None else names:
            layer = self.layers[name]
            by_shape[(layer.out_features, layer.in_features)].append(name)
        for group in by_shape.values():
            with torch.no_grad():
                stack = torch.stack([self._seen(n) for n in group])
            values = batched_svd(stack, compute="values").S.cpu().numpy()
            for name, s in zip(group, values):
                layer = self.layers[name]
                if self.rule_input == "active":
                    s = s[:layer.active_rank]
                rank = grow_rank(s, rank=layer.rank, buffer=layer.buffer, alpha=self.alpha,
                                 max_rank=layer.max_rank, window=self.window)
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
        policy = "transform" if self.moments == "transform" else "slice"
        for layer in self.layers.values():
            remap_state(self.optimizer, layer.truncate(layer.rank), moments=policy)
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
        """The products the increment rule compares with, the stage, the forward counts and
        the generator of new directions (ranks and factors are in the model's state dict)."""
        return {"previous": {name: p.clone() for name, p in self._previous.items()},
                "searching": self.searching,
                "forwards": {name: clock.count for name, clock in self.clocks.items()},
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (load the model's state dict too: it resizes the
        layers to the checkpoint's ranks, keeping the Parameter objects the optimizer holds)."""
        self._previous = {name: p.clone() for name, p in state["previous"].items()}
        self.searching = bool(state["searching"])
        for name, count in state["forwards"].items():
            self.clocks[name].load_state_dict({"count": count})
        if state["generator"] is not None:
            if self.generator is None:
                raise ValueError("the checkpoint has a generator state but this controller "
                                 "has no generator; build it with to_inrank()")
            self.generator.set_state(state["generator"])


def to_inrank(model: nn.Module, *, layers: str | Sequence[str] | None = None,
              variant: str = "vanilla", rank: int = 2, buffer: int | str = 16,
              alpha: float = 0.9, every: int = 25, warmup: int = 100,
              search_steps: int | None = None, rule_input: str = "product",
              fresh_moments: str = "zero", moments: str = "transform",
              window: str = "inclusive", count: str = "steps",
              max_rank: int | str | None = None, init_scale: float = 1.0,
              new_columns: str = "orthogonal", seed: int = 0) -> InRankController:
    """Replace Linear layers of ``model`` (in place) by InRank layers; return their controller.

    Args:
        layers: shell patterns on module paths choosing which nn.Linear to convert. Default
            ``DEFAULT_LAYERS``, the MLP (feed-forward) layers as in the paper: for
            spectra.tasks.models.GPT, blocks.*.mlp.c_fc and blocks.*.mlp.c_proj. A pattern that
            matches only modules that are not nn.Linear is an error.
        variant: "vanilla" (W_0 + U Vᵀ) or "efficient" (U Vᵀ from scratch, two stages).
        rank, init_scale, new_columns: per layer (see layers.LowRankLinear).
        buffer: per layer, an int or "official": the official 100 columns at GPT-2 small's
            ceiling of 384, scaled to each layer's ceiling (round(100 · max_rank / 384), ≥ 1).
        max_rank: the ceiling on active columns: None (min(m, n)), "half" (⌊min(m, n)/2⌋,
            the official code's) or an int.
        alpha, every, warmup, search_steps, rule_input, fresh_moments, moments, window, count:
            the controller's (see InRankController).
        seed: seeds the random directions (or preallocated columns) of new columns.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; accepted: {sorted(VARIANTS)}")
    _check_rule(alpha, every, warmup, search_steps, rule_input, fresh_moments, moments,
                window, count)
    if isinstance(buffer, str) and buffer != "official":
        raise ValueError(f"buffer={buffer!r}; must be an int >= 0 or 'official'")
    if isinstance(max_rank, str) and max_rank != "half":
        raise ValueError(f"max_rank={max_rank!r}; must be an int, 'half' or None")
    generator = torch.Generator().manual_seed(seed)
    names = select_linears(model, DEFAULT_LAYERS if layers is None else layers)
    converted = {}
    for name in names:
        linear = model.get_submodule(name)
        ceiling = min(linear.in_features, linear.out_features) // 2 if max_rank == "half" \
            else max_rank
        layer = VARIANTS[variant].from_linear(
            linear, rank=rank, buffer=_buffer(buffer, ceiling, linear), max_rank=ceiling,
            init_scale=init_scale, new_columns=new_columns, generator=generator)
        replace_module(model, name, layer)
        converted[name] = layer
    return InRankController(converted, alpha=alpha, every=every, warmup=warmup,
                            search_steps=search_steps, rule_input=rule_input,
                            fresh_moments=fresh_moments, moments=moments, window=window,
                            count=count, model=model, generator=generator)


def _buffer(buffer: int | str, ceiling: int | None, linear: nn.Linear) -> int:
    """The buffer of one layer: ``buffer``, or the official one scaled to its ceiling."""
    if buffer != "official":
        return buffer
    ceiling = min(linear.in_features, linear.out_features) if ceiling is None else ceiling
    columns, at = OFFICIAL_BUFFER
    return max(1, round(columns * ceiling / at))


def _check_rule(alpha: Any, every: Any, warmup: Any, search_steps: Any, rule_input: Any,
                fresh_moments: Any, moments: Any, window: Any, count: Any) -> None:
    for name, value, accepted in (("rule_input", rule_input, RULE_INPUTS),
                                  ("fresh_moments", fresh_moments, FRESH),
                                  ("moments", moments, MOMENTS), ("window", window, WINDOWS)):
        if value not in accepted:
            raise ValueError(f"{name}={value!r}; accepted: {accepted}")
    check_count(count)
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
