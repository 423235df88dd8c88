"""Keep an optimizer's per-parameter state consistent when a factor changes its columns.

A low-rank layer holds its weight as factors U (m, k) and V (n, k) with W = U Vᵀ (plus a frozen
W_0 for vanilla InRank). When it grows or truncates its rank it rewrites a factor *in place*
(a new tensor is swapped into the Parameter object, so the optimizer's reference to it
stays the same) and describes how the columns changed with a :class:`ColumnMap`:

    grad_new = grad_old @ C            C (k_old, k_new), for the columns that existed before
    the last ``fresh`` columns         new, with no history

This holds exactly for both changes the layers make:

- growth: U' = [U, 0], V' = [V, V_new]. The function is unchanged, so the old columns receive
  exactly the gradients they would have received: C = [I_k, 0].
- truncation to the top r singular directions: U' = U T_U, V' = V T_V (T: (k, r)). Then
  ∂L/∂U' = G V' = (G V) T_V, so C for U is T_V and C for V is T_U (the factors swap maps).

What :func:`remap_state` does with the optimizer state of such a parameter:

- first moments (Adam ``exp_avg``, SGD ``momentum_buffer``), linear in the gradient:
  m' = m @ C, exact for the gradients seen so far in the new coordinates (with the partner
  factor held at its current value).
- second moments (``exp_avg_sq``, ``max_exp_avg_sq``), quadratic: v' = v @ (C ∘ C), exact when C
  selects or scales columns (growth; truncating factors already in SVD form) and otherwise the
  usual diagonal approximation (cross terms of uncorrelated gradient entries dropped). This is
  what the official InRank code gets wrong at its stage switch: it keeps the first r columns of
  the old moments although the columns themselves were rotated by the SVD.
- fresh columns: first moment 0 and, by default, second moment 0, as for a new parameter. The
  step count (hence Adam's bias correction) is shared by the whole tensor, so a new column's
  first steps are larger than a fresh Adam's: with constant gradients about 4× the learning
  rate after 10 steps at t = 500, 2× after 100, 1.3× after 500. That head start is what lets
  the youngest columns (the buffer) catch up with the old ones; ``fresh="row-mean"`` (second
  moment = the mean of the row's old ones, steps of the size the row already takes) grew the
  ranks less and trained worse in analyses/inrank_gpt.py (docs/inrank.md).
- the step count and every scalar entry are kept.

Any other parameter-shaped state tensor raises ValueError: we do not guess how to map it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class ColumnMap:
    """How the columns of ``param`` changed: ``grad_new[:, :k_mapped] = grad_old @ matrix``
    with ``matrix`` (k_old, k_new − fresh), followed by ``fresh`` new columns."""

    param: torch.nn.Parameter
    matrix: torch.Tensor
    fresh: int = 0


FRESH = ("zero", "row-mean")


def remap_state(optimizer: torch.optim.Optimizer | None, maps: Iterable[ColumnMap], *,
                fresh: str = "zero") -> None:
    """Rewrite the optimizer state of each mapped parameter (already resized) to its new
    columns. Parameters with no state yet (no step taken) are left alone. ``None``: no-op.
    ``fresh``: second moment of fresh columns, "zero" (default) or "row-mean"."""
    if fresh not in FRESH:
        raise ValueError(f"fresh={fresh!r}; accepted: {FRESH}")
    if optimizer is None:
        return
    for change in maps:
        state = optimizer.state.get(change.param)
        if state:
            _remap(state, change, fresh)


def _remap(state: dict, change: ColumnMap, fresh_rule: str) -> None:
    param, matrix = change.param, change.matrix
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            continue
        old = value.to(matrix.dtype)
        if key in FIRST_MOMENTS:
            mapped, fill = old @ matrix, torch.zeros_like(old[:, :1])
        elif key in SECOND_MOMENTS:
            mapped = old @ (matrix * matrix)
            warm = fresh_rule == "row-mean" and old.shape[1] > 0
            fill = old.mean(dim=1, keepdim=True) if warm else torch.zeros_like(old[:, :1])
        else:
            raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)}: cannot map "
                             f"it to the new columns; supported: {FIRST_MOMENTS + SECOND_MOMENTS}")
        fresh = fill.expand(-1, change.fresh)
        new = torch.cat([mapped, fresh], dim=1).to(dtype=value.dtype)
        if new.shape != param.shape:
            raise ValueError(f"column map gives state {key!r} shape {tuple(new.shape)} but the "
                             f"parameter has shape {tuple(param.shape)}")
        state[key] = new.contiguous()
