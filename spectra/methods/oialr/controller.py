"""OIALR (arXiv 2401.08505): orthogonality-informed adaptive low-rank training, as a Method.

The controller, run after every optimizer step:

1. Each candidate layer trains at full rank until its trigger fires: after a fixed ``delay``
   (``oialr``, the paper's rule) or when its own measured basis stability says its singular
   bases have settled (``oialr-stability``, spectra.methods.oialr.trigger). It is then replaced,
   at the same module path, by its U Σ Vᵀ form (spectra.methods.oialr.layers) computing the
   same function; its bias is carried over and keeps training.
2. Every ``frequency`` steps after a layer's conversion: SVD of Σ, rotate U and V (``rotate``),
   then cut the ranks whose σ < β·σ_1, at most half of them per update and never below the
   minimum rank (``cut_rank``). Ranks never grow.

Candidates (docs/architecture.md §7): nn.Linear and nn.Conv2d (zero padding) whose matrix (out, in·kh·kw)
has min dim > max dim / 10; embeddings, norms and biases are never factorised; the first and the
last Linear/Conv2d of the model stay full rank unless ``keep_first`` / ``keep_last`` is False.

Optimizer state. The optimizer keeps training the same parameter groups: at conversion W's
entry is replaced by Σ in its group (keeping weight decay and lr_scale), and at a cut the old Σ
by the new, smaller one. Adam's moments are *transformed* by default (``moments="transform"``), not reset: with
Σ' = Lᵀ Σ R in new coordinates (conversion: L = U, R = V; rotation and cut: L = P[:, :k],
R = Q[:, :k]) the gradient transforms exactly the same way, so the first moment (and SGD's
momentum) becomes Lᵀ m R exactly; the second moment, a running mean of squared gradients,
becomes (L∘L)ᵀ v (R∘R) (exact when the gradient's entries are uncorrelated, always ≥ 0);
the step count is kept. ``moments="reset"`` drops the state of W / Σ instead (the official
code resets at conversion and slices the unrotated moments at cuts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from spectra.methods.modules import replace_module, trainable_count
from spectra.methods.oialr.layers import SVDLayer, to_svd_layer
from spectra.methods.oialr.trigger import StabilityTrigger
from spectra.methods.optim_state import StateMap, remap_state, replace_parameter
from spectra.methods.registry import Method, adamw_for

MOMENTS = ("transform", "reset")
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


def oialr_candidates(model: nn.Module, *, keep_first: bool = True,
                     keep_last: bool = True) -> list[str]:
    """Module paths of the layers OIALR may factorise, in model order (module docstring)."""
    dense = [(path, m) for path, m in model.named_modules()
             if isinstance(m, _DENSE) and not isinstance(m, SVDLayer)]
    kept = {dense[0][0] if keep_first and dense else None,
            dense[-1][0] if keep_last and dense else None}
    return [path for path, m in dense if path not in kept and _eligible(m)]


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
        trigger: when each candidate converts (FixedDelay or oialr_trigger.StabilityTrigger).
        beta: cut the singular values of Σ below beta·σ_1, in (0, 1).
        frequency: optimizer steps between two rotate-and-cut updates of a converted layer.
        min_rank_fraction: ranks never fall below max(1, ⌊fraction·min(m, n)⌋).
        keep_first, keep_last: keep the model's first / last Linear or Conv2d at full rank.
        moments: "transform" or "reset" the optimizer state at conversion and cuts.

    Scalars: ``rank.<path>`` per candidate (min(m, n) before conversion), ``converted_at.<path>``
    (the step it converted, once it has), ``trainable_params``, ``trainable_percent`` (of the
    model's trainable parameters before conversion), and the trigger's scalars.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, trigger: Trigger, *,
                 beta: float = 0.2, frequency: int = 100, min_rank_fraction: float = 0.01,
                 keep_first: bool = True, keep_last: bool = True, moments: str = "transform"):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta={beta!r}; must be in (0, 1) (cut σ < beta·σ_1)")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency={frequency!r}; must be an int >= 1 (optimizer steps)")
        if not 0.0 <= min_rank_fraction <= 1.0:
            raise ValueError(f"min_rank_fraction={min_rank_fraction!r}; must be in [0, 1]")
        if moments not in MOMENTS:
            raise ValueError(f"moments={moments!r}; accepted: {MOMENTS}")
        for name, value in (("keep_first", keep_first), ("keep_last", keep_last)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}; must be True or False")
        self.model, self.optimizer, self.trigger = model, optimizer, trigger
        self.beta, self.frequency, self.moments = beta, frequency, moments
        self.min_rank_fraction = min_rank_fraction
        self.candidates = oialr_candidates(model, keep_first=keep_first, keep_last=keep_last)
        if not self.candidates:
            layers = [p for p, m in model.named_modules() if isinstance(m, _DENSE)]
            raise ValueError(f"{type(model).__name__} has no layer OIALR can factorise "
                             f"(keep_first={keep_first}, keep_last={keep_last}); its "
                             f"Linear/Conv2d layers: {layers}")
        self.converted_at: dict[str, int] = {}
        self.full_params = trainable_count(model)
        self.trigger.watch(model, self.candidates)
        self._trigger_scalars = self._convert_ready(0)

    def __call__(self, step: int) -> dict[str, float]:
        self._trigger_scalars = self._convert_ready(step)
        for path, start in self.converted_at.items():
            if step > start and (step - start) % self.frequency == 0:
                self.cut(path)
        return self.scalars()

    def _convert_ready(self, step: int) -> dict[str, float]:
        scalars = self.trigger(step)
        for path in self.trigger.ready:
            self.convert(path, step)
        return scalars

    def convert(self, path: str, step: int) -> None:
        """Replace the dense layer at ``path`` by U Σ Vᵀ; W's optimizer state goes to Σ."""
        dense = self.model.get_submodule(path)
        (layer,) = convert_layers(self.model, [path]).values()
        replace_parameter(self.optimizer, dense.weight, layer.sigma)
        matrix = StateMap(layer.sigma, left=layer.u.double(), right=layer.v.double(),
                          source=dense.weight)
        remap_state(self.optimizer, [matrix], moments=self.moments)
        self.converted_at[path] = step

    def cut(self, path: str) -> None:
        """Rotate the layer at ``path`` so Σ is diagonal, then cut its rank by the rule."""
        layer = self.model.get_submodule(path)
        rank = cut_rank(layer.singular_values(), layer.rank, self.beta, self.min_rank(layer))
        remap_state(self.optimizer, layer.truncate(rank), moments=self.moments)

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
        for path, step in self.converted_at.items():
            out[f"converted_at.{path}"] = float(step)
        trainable = trainable_count(self.model)
        out["trainable_params"] = float(trainable)
        out["trainable_percent"] = 100.0 * trainable / self.full_params
        return {**out, **self._trigger_scalars}

    def state_dict(self) -> dict[str, Any]:
        """The conversion steps and the trigger's state (ranks and factors are in the model's
        state dict, moments in the optimizer's)."""
        return {"converted_at": dict(self.converted_at), "trigger": self.trigger.state_dict(),
                "trigger_scalars": dict(self._trigger_scalars)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Convert the layers the checkpoint had converted (at full rank: loading the model's
        state dict then sets their ranks and values), restore the trigger."""
        for path in state["converted_at"]:
            if path not in self.converted_at:
                self.convert(path, int(state["converted_at"][path]))
        self.converted_at = {path: int(step) for path, step in state["converted_at"].items()}
        self.trigger.load_state_dict(state["trigger"])
        self._trigger_scalars = dict(state["trigger_scalars"])


_CONTROLLER_OPTIONS = ("beta", "min_rank_fraction", "keep_first", "keep_last", "moments")


def _build(name: str, model: nn.Module, lr: float, weight_decay: float, trigger: Trigger,
           frequency: int, options: dict[str, Any], accepted: tuple[str, ...]) -> Method:
    unknown = sorted(set(options) - set(_CONTROLLER_OPTIONS))
    if unknown:
        raise ValueError(f"method {name!r}: unknown option(s) {unknown}; accepted: "
                         f"{sorted(accepted + _CONTROLLER_OPTIONS)}")
    optimizer = adamw_for(model, lr, weight_decay)
    controller = OIALR(model, optimizer, trigger, frequency=frequency, **options)
    return Method(name, model, optimizer, controller)


def _default_frequency(total_steps: int) -> int:
    return max(1, total_steps // 30)


def oialr_method(model: nn.Module, *, lr: float, weight_decay: float, total_steps: int,
                 delay: int | None = None, frequency: int | None = None,
                 **options: Any) -> Method:
    """OIALR with the paper's fixed delay, trained by AdamW (spectra.methods.registry.adamw_for).

    delay: full-rank steps before conversion (default ⌊total_steps / 3⌋); frequency: steps
    between rank updates (default max(1, ⌊total_steps / 30⌋)): for the 30-epoch MNIST run,
    conversion at epoch 10 and a cut every epoch, the calibration of docs/architecture.md §7. Other options
    (beta, min_rank_fraction, keep_first, keep_last, moments): see OIALR.
    """
    delay = total_steps // 3 if delay is None else delay
    frequency = _default_frequency(total_steps) if frequency is None else frequency
    return _build("oialr", model, lr, weight_decay, FixedDelay(delay), frequency, options,
                  ("delay", "frequency"))


def oialr_stability_method(model: nn.Module, *, lr: float, weight_decay: float,
                           total_steps: int, frequency: int | None = None,
                           check_every: int = 50, k: int = 8, threshold: float = 1e-3,
                           window: int = 3, **options: Any) -> Method:
    """OIALR where each layer converts when its measured basis stability has settled
    (spectra.methods.oialr.trigger.StabilityTrigger), trained by AdamW; no delay.

    frequency: steps between rank updates (default max(1, ⌊total_steps / 30⌋)); check_every,
    k, threshold, window: see StabilityTrigger (the defaults: the top-8 bases turned by less
    than 1e-3 in 1 − s over 50 steps at 3 checks in a row). Other options (beta,
    min_rank_fraction, keep_first, keep_last, moments): see OIALR.
    """
    frequency = _default_frequency(total_steps) if frequency is None else frequency
    trigger = StabilityTrigger(check_every, k=k, threshold=threshold, window=window)
    return _build("oialr-stability", model, lr, weight_decay, trigger, frequency, options,
                  ("frequency", "check_every", "k", "threshold", "window"))
