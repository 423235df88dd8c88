"""OIALR (arXiv 2401.08505): orthogonality-informed adaptive low-rank training, the controller.

Run after every optimizer step (``controller(step)``), or on the model's training forward
calls as the official code counts (``count="forwards"``, spectra.methods.clock):

1. Each candidate layer trains at full rank until its trigger fires: after a fixed ``delay``
   (``FixedDelay``, the paper's rule) or when its own measured basis stability says its
   singular bases have settled (spectra.methods.oialr.trigger). It is then replaced, at the same
   module path, by its U Σ Vᵀ form (spectra.methods.oialr.layers) computing the same function.
2. Every ``frequency`` ticks after a layer's conversion (and at the conversion itself with
   ``cut_at_conversion``): SVD of Σ, rotate U and V, then cut the ranks whose σ < β·σ_1, at
   most half of them per update and never below the minimum rank (``cut_rank``). Ranks never
   grow. With ``phase_in`` only the last layers take part, more at each update (the official
   ``network_layer_perc_step``).

Candidates (docs/architecture.md §7): nn.Linear and nn.Conv2d (zero padding) whose matrix
(out, in·kh·kw) has min dim > max dim / 10; embeddings, norms and biases are never factorised.
``keep_first`` / ``keep_last`` keep the first / last layer dense: of the model's Linear/Conv2d
layers (``keep_among="all"``, ours) or of the eligible ones (``"eligible"``, the official code's,
which keeps the last *converted* layer).

Optimizer state. At conversion Σ takes W's place in its parameter group (weight decay and
lr_scale kept); Σ is resized in place at cuts. ``moments="transform"`` (ours) maps Adam's
moments into the new coordinates (spectra.methods.optim_state: exact for the first moment),
``"official"`` zeroes them at conversion keeping the step count and slices the unrotated
moments at cuts, ``"reset"`` drops them. ``freeze_bias`` stops training a converted layer's bias
(the official layer wraps it in a new Parameter its optimizer never sees).

Every difference from the official code is an option; spectra.methods.oialr.methods names both
sets as presets (docs/oialr.md has the table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from spectra.methods.clock import ForwardClock, check_count
from spectra.methods.modules import replace_module, trainable_count
from spectra.methods.oialr.layers import SVDLayer, to_svd_layer
from spectra.methods.optim_state import StateMap, remap_state, replace_parameter

MOMENTS = {"transform": ("transform", "transform"), "official": ("zero", "slice"),
           "reset": ("reset", "reset")}  # option → (policy at conversion, policy at cuts)
KEEP_AMONG = ("all", "eligible")
_DENSE = (nn.Linear, nn.Conv2d)


class Trigger(Protocol):
    """Decides when a full-rank candidate layer converts to U Σ Vᵀ; a controller
    (spectra.methods.registry.Controller) whose call also sets ``ready``."""

    ready: list[str]
    """The watched paths found ready at the last call; they are no longer watched."""

    def watch(self, model: nn.Module, paths: Sequence[str]) -> None:
        """Decide for the dense layers at ``paths`` of ``model`` from now on."""

    def __call__(self, step: int) -> dict[str, float]:
        """Called after every optimizer step (and at step 0); sets ``ready``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class FixedDelay:
    """The paper's rule: every candidate converts after ``delay`` optimizer steps."""

    def __init__(self, delay: int):
        if not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay={delay!r}; must be an int >= 0 (optimizer steps)")
        self.delay = delay
        self.watched: list[str] = []
        self.ready: list[str] = []

    def watch(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.watched = list(paths)

    def __call__(self, step: int) -> dict[str, float]:
        self.ready = self.watched if step >= self.delay else []
        self.watched = [path for path in self.watched if path not in self.ready]
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"watched": list(self.watched)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.watched = list(state["watched"])


def cut_rank(s: torch.Tensor, rank: int, beta: float, min_rank: int) -> int:
    """OIALR's cut: the number of singular values σ ≥ β·σ_1 in ``s`` (k,) descending, but at
    least ⌊rank / 2⌋ (at most half cut per update) and ``min_rank``; never above ``rank``."""
    above = int((s >= beta * s[0]).sum())
    return min(rank, max(above, rank // 2, min_rank))


def oialr_candidates(model: nn.Module, *, keep_first: bool = False, keep_last: bool = True,
                     keep_among: str = "all") -> list[str]:
    """Module paths of the layers OIALR may factorise, in model order (module docstring)."""
    if keep_among not in KEEP_AMONG:
        raise ValueError(f"keep_among={keep_among!r}; accepted: {KEEP_AMONG}")
    dense = [path for path, m in model.named_modules()
             if isinstance(m, _DENSE) and not isinstance(m, SVDLayer)]
    eligible = [path for path in dense if _eligible(model.get_submodule(path))]
    pool = dense if keep_among == "all" else eligible
    kept = set(pool[:1] if keep_first else []) | set(pool[-1:] if keep_last else [])
    return [path for path in eligible if path not in kept]


def _matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in·kh·kw): the shape of a dense layer's weight read as a matrix."""
    return layer.weight.shape[0], layer.weight[0].numel()


def _eligible(layer: nn.Module) -> bool:
    m, n = _matrix_shape(layer)
    zeros = getattr(layer, "padding_mode", "zeros") == "zeros"
    return zeros and min(m, n) > max(m, n) / 10


def convert_layers(model: nn.Module, paths: list[str]) -> dict[str, SVDLayer]:
    """Replace each dense layer at ``paths`` by its U Σ Vᵀ form at the same path (in place,
    same function, full rank). Returns the new layers. Use it to rebuild a converted model
    before ``load_state_dict`` (the layers take the checkpoint's ranks)."""
    converted = {}
    for path in paths:
        converted[path] = to_svd_layer(model.get_submodule(path))
        replace_module(model, path, converted[path])
    return converted


class OIALR:
    """The OIALR controller: ``controller(step)`` after every optimizer step converts, rotates
    and cuts layers of ``model`` and returns the scalars to record (module docstring).

    Args:
        model: the model (layers are replaced in place, at their module paths).
        optimizer: the optimizer training ``model``; kept consistent (module docstring).
        trigger: when each candidate converts (FixedDelay or trigger.StabilityTrigger).
        beta: cut the singular values of Σ below beta·σ_1, in (0, 1).
        frequency: ticks between two rotate-and-cut updates of a converted layer.
        min_rank_fraction: ranks never fall below max(1, ⌊fraction·min(m, n)⌋).
        keep_first, keep_last, keep_among: which layers stay dense (module docstring).
        moments: "transform", "official" or "reset" (module docstring).
        count: what a tick is, "steps" or "forwards" (training forward calls of ``model``).
        cut_at_conversion: a first rotate-and-cut at the conversion tick itself.
        phase_in: None (every converted layer takes part in every update) or the official
            fraction p: at the n-th update only the last n·⌊(L − 1)·p⌋ of the L converted
            layers do (all of them while that is 0).
        freeze_bias: stop training a converted layer's bias.

    Scalars: ``rank.<path>`` per candidate (min(m, n) before conversion), ``converted_at.<path>``
    (the tick it converted, once it has), ``trainable_params``, ``trainable_percent`` (of the
    model's trainable parameters before conversion), and the trigger's scalars.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, trigger: Trigger, *,
                 beta: float = 0.2, frequency: int = 100, min_rank_fraction: float = 0.01,
                 keep_first: bool = False, keep_last: bool = True, keep_among: str = "all",
                 moments: str = "transform", count: str = "steps",
                 cut_at_conversion: bool = False, phase_in: float | None = None,
                 freeze_bias: bool = False):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta!r}; must be in (0, 1) (cut σ < beta·σ_1)")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency={frequency!r}; must be an int >= 1 (ticks)")
        if not 0.0 <= min_rank_fraction <= 1.0:
            raise ValueError(f"min_rank_fraction={min_rank_fraction!r}; must be in [0, 1]")
        if moments not in MOMENTS:
            raise ValueError(f"moments={moments!r}; accepted: {tuple(MOMENTS)}")
        if phase_in is not None and not 0.0 < phase_in <= 1.0:
            raise ValueError(f"phase_in={phase_in!r}; must be None or in (0, 1]")
        check_count(count)
        for name, value in (("keep_first", keep_first), ("keep_last", keep_last),
                            ("cut_at_conversion", cut_at_conversion),
                            ("freeze_bias", freeze_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; must be True or False")
        self.model, self.optimizer, self.trigger = model, optimizer, trigger
        self.beta, self.frequency, self.moments = beta, frequency, moments
        self.min_rank_fraction, self.phase_in = min_rank_fraction, phase_in
        self.cut_at_conversion, self.freeze_bias = cut_at_conversion, freeze_bias
        self.candidates = oialr_candidates(model, keep_first=keep_first, keep_last=keep_last,
                                           keep_among=keep_among)
        if not self.candidates:
            layers = [p for p, m in model.named_modules() if isinstance(m, _DENSE)]
            raise ValueError(f"{type(model).__name__} has no layer OIALR can factorise "
                             f"(keep_first={keep_first}, keep_last={keep_last}, "
                             f"keep_among={keep_among!r}); its Linear/Conv2d layers: {layers}")
        self.converted_at: dict[str, int] = {}
        self.updates = 0  # rotate-and-cut rounds so far (what phase_in counts)
        self.full_params = trainable_count(model)
        self.trigger.watch(model, self.candidates)
        self._trigger_scalars: dict[str, float] = {}
        self.clock = ForwardClock(model, self._tick, training_only=True) \
            if count == "forwards" else None
        self._tick(0)

    def __call__(self, step: int) -> dict[str, float]:
        """After optimizer step ``step``: act (counting steps), return the scalars."""
        if self.clock is None:
            self._tick(step)
        return self.scalars()

    def _tick(self, tick: int) -> None:
        self._trigger_scalars = self.trigger(tick)
        for path in self.trigger.ready:
            self.convert(path, tick)
        due = [path for path, start in self.converted_at.items()
               if (tick > start or self.cut_at_conversion and tick == start)
               and (tick - start) % self.frequency == 0]
        if due:
            self.updates += 1
            taking_part = self._phased_in()
            for path in due:
                if path in taking_part:
                    self.cut(path)

    def _phased_in(self) -> set[str]:
        """The converted layers that take part in the current update (``phase_in``)."""
        converted = [path for path in self.candidates if path in self.converted_at]
        if self.phase_in is None:
            return set(converted)
        last = self.updates * int((len(converted) - 1) * self.phase_in)
        return set(converted[-last:] if last else converted)

    def convert(self, path: str, tick: int) -> None:
        """Replace the dense layer at ``path`` by U Σ Vᵀ; W's optimizer state goes to Σ."""
        dense = self.model.get_submodule(path)
        (layer,) = convert_layers(self.model, [path]).values()
        replace_parameter(self.optimizer, dense.weight, layer.sigma)
        matrix = StateMap(layer.sigma, left=layer.u.double(), right=layer.v.double(),
                          source=dense.weight)
        remap_state(self.optimizer, [matrix], moments=MOMENTS[self.moments][0])
        if self.freeze_bias and layer.bias is not None:
            _drop_parameter(self.optimizer, layer.bias)
            layer.bias.requires_grad_(False)
        self.converted_at[path] = tick

    def cut(self, path: str) -> None:
        """Rotate the layer at ``path`` so Σ is diagonal, then cut its rank by the rule."""
        layer = self.model.get_submodule(path)
        rank = cut_rank(layer.singular_values(), layer.rank, self.beta, self.min_rank(layer))
        remap_state(self.optimizer, layer.truncate(rank), moments=MOMENTS[self.moments][1])

    def min_rank(self, layer: SVDLayer) -> int:
        """The smallest rank a layer may be cut to."""
        short = min(layer.u.shape[0], layer.v.shape[0])
        return max(1, int(self.min_rank_fraction * short))

    def scalars(self) -> dict[str, float]:
        out = {}
        for path in self.candidates:
            layer = self.model.get_submodule(path)
            rank = layer.rank if isinstance(layer, SVDLayer) else min(_matrix_shape(layer))
            out[f"rank.{path}"] = float(rank)
        for path, tick in self.converted_at.items():
            out[f"converted_at.{path}"] = float(tick)
        trainable = trainable_count(self.model)
        out["trainable_params"] = float(trainable)
        out["trainable_percent"] = 100.0 * trainable / self.full_params
        return {**out, **self._trigger_scalars}

    def state_dict(self) -> dict[str, Any]:
        """The conversion ticks, the update count, the forward count and the trigger's state
        (ranks and factors are in the model's state dict, moments in the optimizer's)."""
        return {"converted_at": dict(self.converted_at), "updates": self.updates,
                "forwards": None if self.clock is None else self.clock.count,
                "trigger": self.trigger.state_dict(),
                "trigger_scalars": dict(self._trigger_scalars)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Convert the layers the checkpoint had converted (at full rank: loading the model's
        state dict then sets their ranks and values), restore the rest."""
        for path, tick in state["converted_at"].items():
            if path not in self.converted_at:
                self.convert(path, int(tick))
        self.converted_at = {path: int(tick) for path, tick in state["converted_at"].items()}
        self.updates = int(state["updates"])
        if self.clock is not None:
            self.clock.load_state_dict({"count": state["forwards"]})
        self.trigger.load_state_dict(state["trigger"])
        self._trigger_scalars = dict(state["trigger_scalars"])


def _drop_parameter(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> None:
    """Remove ``param`` (and its state) from the optimizer."""
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]
    optimizer.state.pop(param, None)
