"""Keep an optimizer's state consistent when a low-rank method changes a parameter's coordinates.

Every change the methods make is linear in the coordinates of one parameter:

    new = Lᵀ · old · R       L (m_old, m_new), R (n_old, n_new); None means the identity,

followed by ``fresh`` new columns with no history. The parameter's gradient transforms the same
way (holding the rest of the layer fixed), which is what makes the map exact for first moments.
A :class:`StateMap` says this for one parameter:

- InRank growth, U' = [U, 0], V' = [V, V_new] (the one-sided case): L = R = None, ``fresh`` new
  columns. The function is unchanged, so the old columns receive exactly the gradients they
  would have received.
- InRank truncation to the top r directions, U' = U T_U, V' = V T_V (T: (k, r)): ∂L/∂U' =
  (∂L/∂U) T_V, so R = T_V for U and R = T_U for V (the factors swap maps).
- OIALR conversion, W (m, n) → Σ = Uᵀ W V (k, k): L = U, R = V; the state moves from W's
  Parameter (``source``) to Σ's, which takes W's place in the parameter groups
  (:func:`replace_parameter`).
- OIALR rotation and cut, Σ' = Pᵀ Σ Q restricted to the top r: L = P[:, :r], R = Q[:, :r].

What :func:`remap_state` does with the state of such a parameter (``moments="transform"``):

- first moments (Adam ``exp_avg``, SGD ``momentum_buffer``), linear in the gradient:
  m' = Lᵀ m R, exactly the running mean of the gradients the new coordinates would have seen.
- second moments (``exp_avg_sq``, ``max_exp_avg_sq``), quadratic: v' = (L∘L)ᵀ v (R∘R): exact
  when the maps select, scale or permute (growth; already-diagonal factors), otherwise the
  diagonal approximation (cross terms of uncorrelated gradient entries dropped); always ≥ 0,
  its total preserved by square orthogonal maps.
- fresh columns: first moment 0 and, by default, second moment 0, as for a new parameter. The
  step count (hence Adam's bias correction) is shared by the whole tensor, so a fresh column's
  first steps are larger than a new Adam's: the head start that lets InRank's youngest columns
  catch up (``fresh="row-mean"``: the row's mean second moment instead).
- the step count and every scalar entry are kept.

The other policies (``moments=``), what the official InRank and OIALR code do:

- "zero": moments set to zero in the new shape, the step count kept (OIALR at conversion);
  Adam's bias correction then divides the first updates by 1 − β^t ≈ 1 instead of a fresh
  Adam's 1 − β, so they are smaller than a new parameter's.
- "slice": the leading block of the old moments in the new shape, new entries zero, the maps
  ignored (OIALR at cuts, InRank at its stage switch): moments accumulated in the old,
  unrotated coordinates.
- "reset": the state dropped (a fresh Adam, the step count restarting).

Any other parameter-shaped state tensor raises ValueError: we do not guess how to map it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
FRESH = ("zero", "row-mean")
MOMENTS = ("transform", "zero", "slice", "reset")


@dataclass(frozen=True)
class StateMap:
    """``param``'s state is ``source``'s (default: ``param`` itself, already resized) mapped
    to Lᵀ · state · R (``left`` = L, ``right`` = R, None: identity) followed by ``fresh`` new
    columns; the state is read as a matrix (rows, -1), so conv kernels work too."""

    param: nn.Parameter
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    fresh: int = 0
    source: nn.Parameter | None = None


def remap_state(optimizer: torch.optim.Optimizer | None, maps: Iterable[StateMap], *,
                moments: str = "transform", fresh: str = "zero") -> None:
    """Rewrite the optimizer state of each mapped parameter (module docstring). Parameters with
    no state yet (no step taken) are left alone; ``optimizer=None`` is a no-op.

    moments: "transform" (map the moments), "zero", "slice" or "reset" (module docstring).
    fresh: second moment of fresh columns, "zero" or "row-mean"."""
    if moments not in MOMENTS:
        raise ValueError(f"moments={moments!r}; accepted: {MOMENTS}")
    if fresh not in FRESH:
        raise ValueError(f"fresh={fresh!r}; accepted: {FRESH}")
    if optimizer is None:
        return
    for change in maps:
        source = change.param if change.source is None else change.source
        state = optimizer.state.pop(source, None)
        if not state or moments == "reset":
            continue
        optimizer.state[change.param] = {key: _mapped(key, value, change, moments, fresh)
                                          for key, value in state.items()}


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter,
                      new: nn.Parameter) -> None:
    """Put ``new`` where ``old`` is in the optimizer's parameter groups (same group, so the
    same learning rate and weight decay). The state moves with a StateMap(new, source=old)."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
                return
    raise ValueError("the optimizer does not train the parameter being replaced; build the "
                     "optimizer from model.parameters() before the method changes the model")


def _mapped(key: str, value, change: StateMap, policy: str, fresh_rule: str):
    if key not in FIRST_MOMENTS + SECOND_MOMENTS:
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)}: cannot map it "
                             f"to the new coordinates; supported: "
                             f"{FIRST_MOMENTS + SECOND_MOMENTS}")
        return value  # the step count and other scalars
    if value is None:
        return value  # SGD without momentum
    if policy == "zero":
        return torch.zeros_like(change.param, dtype=value.dtype)
    if policy == "slice":
        return _leading_block(value, change.param)
    rows = value.shape[0] if change.left is None else change.left.shape[0]
    old = value.detach().double().reshape(rows, -1)
    second = key in SECOND_MOMENTS
    mapped = old
    if change.left is not None:
        left = change.left.double()
        mapped = (left * left if second else left).T @ mapped
    if change.right is not None:
        right = change.right.double()
        mapped = mapped @ (right * right if second else right)
    if change.fresh:
        warm = second and fresh_rule == "row-mean" and old.shape[1] > 0
        fill = old.mean(dim=1, keepdim=True) if warm else mapped.new_zeros(mapped.shape[0], 1)
        mapped = torch.cat([mapped, fill.expand(-1, change.fresh)], dim=1)
    if mapped.numel() != change.param.numel():
        raise ValueError(f"state map gives {key!r} shape {tuple(mapped.shape)} but the parameter "
                         f"has shape {tuple(change.param.shape)}")
    return mapped.reshape(change.param.shape).to(value.dtype).contiguous()


def _leading_block(value: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The leading block of ``value`` in ``param``'s shape (read as matrices), zero-padded."""
    old = value.detach().reshape(value.shape[0], -1)
    rows, cols = param.shape[0], param[0].numel() if param.ndim > 1 else 1
    block = old.new_zeros(rows, cols)
    r, c = min(rows, old.shape[0]), min(cols, old.shape[1])
    block[:r, :c] = old[:r, :c]
    return block.reshape(param.shape).contiguous()
