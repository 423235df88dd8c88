"""When a layer's singular bases have settled: the trigger of ``oialr-stability``.

OIALR's premise is that the orthogonal bases U, V of a weight's SVD stop moving during
training, after which only Σ needs training. The authors measure it (the basis stability of
spectra.core.metrics.oialr_stability) but convert after a fixed, hand-chosen delay. This trigger
converts each layer when *its own* measured stability says so:

    every ``every`` optimizer steps: top-k SVD of the live weight (spectra.core.linalg.batched_svd),
    s = oialr_stability(previous check's top-k U, Vh; this check's)
    convert when 1 − s < ``threshold`` at ``window`` consecutive checks.

Why the top-k bases and 1 − s (measured during full-rank training of the MNIST MLP and the
character GPT, docs/oialr.md): the full-basis stability is within a few percent of 1 from the
first check (the random bulk of the matrix barely moves) and creeps towards 1, so "s > 0.9"
says nothing; and on a square layer the smallest singular value can pass through zero between
checks, flipping the sign of its term u vᵀ in the polar factor (1 − s jumps to 2/r): noise
exactly where the signal should be small. The top-k polar
factor starts nearly fully rotated between checks (1 − s of 0.1 to 1: the top directions of a
random initialisation are not learned yet) and its distance from 1 then falls by three to five
decades, so a threshold on it reads an absolute scale that does not depend on the layer's
size. 1 − s grows with the interval between checks, so ``threshold`` is tied to ``every``.
"""

from __future__ import annotations

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
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._streak: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def ready(self, step: int, path: str, layer: nn.Module) -> bool:
        """Check ``layer`` (at module ``path``) if ``step`` is a multiple of ``every``."""
        if step % self.every:
            return False
        weight = layer.weight.detach()
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
        if self._streak[path] < self.window:
            return False
        del self._previous[path], self._last[path]
        return True

    def scalars(self) -> dict[str, float]:
        return {f"stability.{path}": value for path, value in self._last.items()}
