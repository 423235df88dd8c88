"""When a layer's singular bases have settled: the trigger of ``oialr-stability``.

OIALR's premise is that the orthogonal bases U, V of a weight's SVD stop moving during
training, after which only Σ needs training. This trigger converts each layer when *its own*
measured stability says so (a controller of spectra.methods.registry whose call also sets
``ready``, see spectra.methods.oialr.controller.Trigger):

    every ``every`` optimizer steps: top-k SVD of the live weight (spectra.core.linalg.batched_svd),
    s = oialr_stability(previous check's top-k U, Vh; this check's)
    convert when 1 − s < ``threshold`` at ``window`` consecutive checks.

Why the top-k bases rather than the full basis of the authors' measure: the full-basis
stability is dominated by the random bulk of the matrix, which barely moves, and on a square
layer the smallest singular value can pass through zero between checks, flipping the sign of
its term u vᵀ in the polar factor (1 − s jumps to 2/r): noise exactly where the signal should
be small. The top-k polar factor starts fully rotated (the top directions of a random
initialisation are not learned yet) and its distance from 1 then falls by decades (what was
measured, and on which runs: docs/oialr.md). 1 − s grows with the interval between checks, so
``threshold`` is tied to ``every``.
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
        threshold: convert when 1 − s is below this at ``window`` consecutive checks.
        window: consecutive checks the threshold must hold.
        seed: seed of the SVD engine's randomized method (used only for very large layers).

    Scalars: ``stability.<path>`` = s at the layer's last check, while it is at full rank.
    """

    def __init__(self, every: int, *, k: int = 8, threshold: float = 1e-3, window: int = 3,
                 seed: int = 0):
        for name, value in (("every", every), ("k", k), ("window", window)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; must be an int >= 1")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold!r}; must be in (0, 1) (a bound on 1 − s)")
        self.every, self.k, self.threshold, self.window, self.seed = every, k, threshold, window, seed
        self.model: nn.Module | None = None
        self.watched: list[str] = []
        self.ready: list[str] = []
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._streak: dict[str, int] = {}
        self._last: dict[str, float] = {}

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
            del self._previous[path], self._last[path]
        return {f"stability.{path}": value for path, value in self._last.items()}

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
        settled = 1.0 - stability < self.threshold
        self._streak[path] = self._streak.get(path, 0) + 1 if settled else 0
        return self._streak[path] >= self.window

    def state_dict(self) -> dict[str, Any]:
        return {"watched": list(self.watched),
                "previous": {path: (u.clone(), vh.clone())
                             for path, (u, vh) in self._previous.items()},
                "streak": dict(self._streak), "last": dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.watched = list(state["watched"])
        self._previous = {path: (u.clone(), vh.clone())
                          for path, (u, vh) in state["previous"].items()}
        self._streak, self._last = dict(state["streak"]), dict(state["last"])
