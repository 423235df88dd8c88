"""InRank's rank rule: how far a layer's rank grows from the singular values of its product.

g(j) = 1 − Var(σ ⊙ 1[i ≥ j]) / Var(σ) over all min(m, n) singular values of the product U Vᵀ
(zeros included; ``spectra.core.metrics.inrank_explained_ratio``, the official
``in_rank_efficient.py``'s ratio), searched over a window above the current rank r with buffer
b and ceiling M (``max_rank``). Two windows (``window=``):

- "inclusive" (ours): the first j in [max(r, 1), top] with g(j) > α, top = min(r + b, M − b);
  top if none passes; r if the window is empty (top ≤ r: buffer 0, or the ceiling reached) or
  the product is zero (nothing learned yet).
- "official": evaluated only while r < M − b; the first j in [r, top − 1] with g(j) > α, else
  top − 1. So buffer 1 never grows, and buffer 0 is an empty range (the official code then
  fails; here the rank stays). A zero product has no ratio (NaN), none passes: top − 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectra.core.metrics import inrank_explained_ratio

WINDOWS = ("inclusive", "official")


def grow_rank(s: Any, *, rank: int, buffer: int, alpha: float, max_rank: int,
              window: str = "inclusive") -> int:
    """The new rank (≥ ``rank``) from the singular values ``s`` (min(m, n),) of the product,
    descending (module docstring)."""
    if window not in WINDOWS:
        raise ValueError(f"window={window!r}; accepted: {WINDOWS}")
    s = np.asarray(s, dtype=np.float64)
    top = min(rank + buffer, max_rank - buffer)
    if window == "official":
        first, last = rank, top - 1
        if rank >= max_rank - buffer or last < first:
            return rank
    else:
        first, last = max(rank, 1), top
        if top <= rank or not s.size or s[0] == 0:
            return rank
    g = inrank_explained_ratio(s)
    for j in range(first, last + 1):
        if j > 0 and g[j - 1] > alpha:  # g(0) = 0; NaN (a flat spectrum) never passes
            return j
    return last
