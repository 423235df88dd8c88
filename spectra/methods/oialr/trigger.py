"""When a layer's singular bases have settled: the trigger of ``oialr-stability``.

OIALR's premise is that the orthogonal bases U, V of a weight's SVD stop moving during
training, after which only Σ needs training. This trigger converts each layer when *its own*
measured stability says so (a controller of spectra.methods.registry whose call also sets
``ready``, see spectra.methods.oialr.controller.Trigger):

    every ``every`` ticks: top-k SVD of the live weight (spectra.core.linalg.batched_svd),
    d = 1 − oialr_stability(previous check's top-k U, Vh; this check's),
    peak = the largest d of the layer so far (its early-training level),
    convert when d < ``ratio`` · peak at ``window`` consecutive checks.

The rule is scale-free: it reads each layer's basis motion relative to that layer's own
early motion, so one setting serves layers and tasks whose bases move at different rates
(the authors' ``oialr/linear.py`` converts on an absolute threshold of the full-basis
similarity, ``uvhthreshold``; docs/oialr.md says what differs).

Why the top-k bases rather than the full basis of the authors' measure: the full-basis
stability is dominated by the random bulk of the matrix, which barely moves, and on a square
layer the smallest singular value can pass through zero between checks, flipping the sign of
its term u vᵀ in the polar factor (1 − s jumps to 2/r): noise exactly where the signal should
be small. The top-k polar factor starts fully rotated (the top directions of a random
initialisation are not learned yet) and its distance from 1 then falls by decades (what was
measured, and on which runs: docs/oialr.md). 1 − s grows with the interval between checks;
the peak is measured at the same interval, so the ratio does not depend on it to first order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spectra.core.linalg import batched_svd
from spectra.core.metrics import oialr_stability


class StabilityTrigger:
    """Convert a layer when its top-k basis stability has stayed near 1 (module docstring).

    Args:
        every: optimizer steps between two checks of a layer (the stability's interval).
        k: number of leading singular triplets compared (capped at min(m, n)).
        ratio: convert when d is below ``ratio`` times the layer's peak d, in (0, 1).
        window: consecutive checks the condition must hold.
        seed: seed of the SVD engine's randomized method (used only for very large layers).

    Scalars: ``stability.<path>`` = s at the layer's last check and ``stability_peak.<path>``
    = its peak d, while it is at full rank.
    """

    def __init__(self, every: int, *, k: int = 8, ratio: float = 0.03, window: int = 3,
                 seed: int = 0):
        for name, value in (("every", every), ("k", k), ("window", window)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; must be an int >= 1")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio={ratio!r}; must be in (0, 1) (a fraction of the peak 1 − s)")
        self.every, self.k, self.ratio, self.window, self.seed = every, k, ratio, window, seed
        self.model: nn.Module | None = None
        self.watched: list[str] = []
        self.ready: list[str] = []
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._streak: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._peak: dict[str, float] = {}

    def watch(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model, self.watched = model, list(paths)

    def __call__(self, step: int) -> dict[str, float]:
        """Check every watched layer if ``step`` is a multiple of ``every``; returns the last
        reading of each layer still watched."""
        self.ready = []
        if step % self.every == 0:
            self.ready = [path for path in self.watched if self._settled(path)]
        for path in self.ready:
            self.watched.remove(path)
            del self._previous[path], self._last[path], self._peak[path]
        return {**{f"stability.{path}": value for path, value in self._last.items()},
                **{f"stability_peak.{path}": value for path, value in self._peak.items()}}

    def _settled(self, path: str) -> bool:
        """Check the layer at ``path`` now: has it stayed settled for ``window`` checks?"""
        weight = self.model.get_submodule(path).weight.detach()
        matrix = weight.reshape(weight.shape[0], -1)
        svd = batched_svd(matrix[None], compute="topk", k=min(self.k, *matrix.shape),
                          seed=self.seed)
        now = (svd.U[0], svd.Vh[0])
        previous = self._previous.get(path)
        self._previous[path] = now
        if previous is None:
            return False
        stability = float(oialr_stability(*previous, *now))
        self._last[path] = stability
        distance = 1.0 - stability
        self._peak[path] = max(self._peak.get(path, 0.0), distance)
        settled = distance < self.ratio * self._peak[path]
        self._streak[path] = self._streak.get(path, 0) + 1 if settled else 0
        return self._streak[path] >= self.window

    def state_dict(self) -> dict[str, Any]:
        return {"watched": list(self.watched),
                "previous": {path: (u.clone(), vh.clone())
                             for path, (u, vh) in self._previous.items()},
                "streak": dict(self._streak), "last": dict(self._last),
                "peak": dict(self._peak)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.watched = list(state["watched"])
        self._previous = {path: (u.clone(), vh.clone())
                          for path, (u, vh) in state["previous"].items()}
        self._streak, self._last = dict(state["streak"]), dict(state["last"])
        self._peak = dict(state["peak"])
