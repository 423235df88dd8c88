"""InRank layers: a Linear whose weight (or whose cumulative update) is a low-rank product.

- :class:`InRankLinear` (vanilla InRank): W = W_0 + U Vᵀ, W_0 the frozen starting weight.
- :class:`InRankEfficientLinear` (efficient InRank): W = U Vᵀ, no dense weight at all; the
  official code names the factors B = U (out, k) and A = Vᵀ (k, in).

Both hold U (out_features, c) and V (in_features, c) as Parameters, of which the first
k = min(rank + buffer, max_rank) columns are *active*: ``rank`` is what the InRank rule decided,
``buffer`` the extra columns that let the next directions show up (the controller in
spectra.methods.inrank.controller decides when to grow). ``weight`` is the dense effective
weight (out, in) of the active columns, a tensor computed from the factors, not a Parameter, so
spectra's Recorder records these layers like any Linear.

How columns come into being (``new_columns``):

- "orthogonal" (ours): only the active columns exist (c = k), so parameter count and compute are
  those of the current rank. Growing keeps the function: new columns get U = 0 and V random
  directions orthogonal to the current V (scaled to the current columns' mean norm), so the
  buffer explores input directions the layer does not use yet. "random": the same without the
  orthogonalisation.
- "kaiming" (the official code): all c = max_rank columns are allocated at construction,
  Kaiming-uniform (U ~ U(±1/√c), V ~ U(±1/√in)); growing activates the next preallocated
  columns, whose values weight decay has shrunk meanwhile (they receive no gradient while
  inactive), and the function jumps.

Resizing swaps new tensors into the Parameters (spectra.methods.modules.resize_parameter),
keeping the Parameter objects the optimizer holds; each change returns the StateMaps that
spectra.methods.optim_state needs to carry the optimizer state over.

State dict: the factors plus ``_extra_state = {"rank": r, "buffer": b}``; loading resizes the
factors first, so a checkpoint loads into a layer of any rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from spectra.core.linalg import batched_svd
from spectra.methods.modules import resize_parameter
from spectra.methods.optim_state import StateMap

NEW_COLUMNS = ("orthogonal", "random", "kaiming")


class LowRankLinear(nn.Module):
    """Common part of the InRank layers: factors U (out, k), V (in, k), bias, rank and buffer.

    Args:
        in_features, out_features: as nn.Linear.
        rank: the rank r decided so far (≥ 0). buffer: extra active columns b (≥ 0).
        max_rank: cap on the active columns k = min(r + b, max_rank); default min(in, out).
        bias: learn an additive bias (out,).
        init_scale: norm of each new column of V when the layer has none yet ("kaiming":
            the factor multiplying the preallocated columns, as the official code's).
        new_columns: how columns come into being, "orthogonal" (default), "random" or
            "kaiming" (preallocated, the official code's; module docstring).
        generator: torch.Generator for the random new directions (reproducible growth).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 2, buffer: int = 16,
                 max_rank: int | None = None, bias: bool = True, init_scale: float = 1.0,
                 new_columns: str = "orthogonal", generator: torch.Generator | None = None,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        full = min(in_features, out_features)
        max_rank = full if max_rank is None else max_rank
        _check_int("max_rank", max_rank, 1, full)
        _check_int("rank", rank, 0, max_rank)
        _check_int("buffer", buffer, 0, None)
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale!r}; must be > 0")
        if new_columns not in NEW_COLUMNS:
            raise ValueError(f"new_columns={new_columns!r}; accepted: {NEW_COLUMNS}")
        self.new_columns = new_columns
        self.in_features, self.out_features = in_features, out_features
        self.max_rank, self.init_scale, self.generator = max_rank, init_scale, generator
        self.rank, self.buffer = rank, buffer
        factory = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.zeros(out_features, 0, **factory))
        self.v = nn.Parameter(torch.zeros(in_features, 0, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self._activate(max_rank if new_columns == "kaiming" else self.active_rank)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> "LowRankLinear":
        """A layer of this kind in place of ``linear``: same shape, device, dtype and bias; the
        weight set from ``linear.weight`` as the subclass says (``_start_from``)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **options)
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer._start_from(linear.weight.detach())
        return layer

    def _start_from(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def active_rank(self) -> int:
        """k = min(rank + buffer, max_rank): the columns of U and V in use."""
        return min(self.rank + self.buffer, self.max_rank)

    @property
    def columns(self) -> int:
        """c: the columns U and V hold (k, or max_rank while "kaiming" columns wait)."""
        return self.u.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active columns of U (out, k) and V (in, k)."""
        k = self.active_rank
        return self.u[:, :k], self.v[:, :k]

    @property
    def full_rank(self) -> int:
        """min(in_features, out_features): the total rank the layer could have."""
        return min(self.in_features, self.out_features)

    def product(self) -> torch.Tensor:
        """U Vᵀ (out, in) of the active columns: the low-rank part of the weight (what the
        InRank rule measures)."""
        u, v = self.factors()
        return u @ v.T

    def grow(self, rank: int) -> list[StateMap]:
        """Set the rank to ``rank`` (≥ the current one) and activate rank + buffer columns
        (capped at max_rank); new ones as ``new_columns`` says (module docstring)."""
        if rank < self.rank:
            raise ValueError(f"rank={rank} < current rank {self.rank}; InRank never shrinks "
                             "(use truncate() to drop the buffer)")
        _check_int("rank", rank, 0, self.max_rank)
        self.rank = rank
        return self._activate(self.active_rank)

    @torch.no_grad()
    def truncate(self, rank: int) -> list[StateMap]:
        """Keep the top ``rank`` singular directions of U Vᵀ: the layer then trains exactly
        ``rank`` columns (rank → ``rank``, buffer → 0).

        With U = Q_U R_U, V = Q_V R_V and the SVD of the small core R_U R_Vᵀ = P S Qᵀ:
        U' = U T_U, V' = V T_V with T_U = R_U⁺ P_r S_r^½, T_V = R_V⁺ Q_r S_r^½, so U' V'ᵀ is the
        best rank-r approximation of U Vᵀ with balanced factors. The StateMaps carry the
        optimizer state through these linear maps (spectra.methods.optim_state).
        """
        _check_int("rank", rank, 0, self.active_rank)
        r, k, c = rank, self.active_rank, self.columns
        u, v = (f.detach().double() for f in self.factors())
        r_u, r_v = torch.linalg.qr(u).R, torch.linalg.qr(v).R
        svd = batched_svd((r_u @ r_v.T)[None], compute="full")
        root = svd.S[0, :r].sqrt()
        t_u = torch.linalg.pinv(r_u) @ (svd.U[0, :, :r] * root)
        t_v = torch.linalg.pinv(r_v) @ (svd.Vh[0, :r].T * root)
        resize_parameter(self.u, u @ t_u)
        resize_parameter(self.v, v @ t_v)
        self.rank, self.buffer = r, 0
        # the maps act on all c columns the state has; waiting (inactive) ones map to nothing
        pad = t_u.new_zeros(c - k, r)
        return [StateMap(self.u, right=torch.cat([t_v, pad])),
                StateMap(self.v, right=torch.cat([t_u, pad]))]

    # -- resizing ------------------------------------------------------------------------------

    @torch.no_grad()
    def _activate(self, k: int) -> list[StateMap]:
        """Hold at least k columns: new ones as ``new_columns`` says (none while preallocated
        columns wait)."""
        old = self.columns
        if k <= old:
            return []
        new_u, new_v = self._new_columns(k - old)
        resize_parameter(self.u, torch.cat([self.u, new_u], 1))
        resize_parameter(self.v, torch.cat([self.v, new_v], 1))
        return [StateMap(self.u, fresh=k - old), StateMap(self.v, fresh=k - old)]

    def _new_columns(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, count) new columns of U and (in, count) of V, as ``new_columns`` says."""
        u = self.u.new_zeros(self.out_features, count)
        if self.new_columns == "kaiming":  # kaiming_uniform_(a=√5): U(±1/√fan_in)
            u = torch.rand(u.shape, generator=self.generator) * 2 - 1
            v = torch.rand(self.in_features, count, generator=self.generator) * 2 - 1
            scale = self.init_scale
            return ((u * scale / math.sqrt(count)).to(self.u),
                    (v * scale / math.sqrt(self.in_features)).to(self.v))
        return u, self._new_directions(count)

    def _new_directions(self, count: int) -> torch.Tensor:
        """(in, count) random columns, each with the mean column norm of V (``init_scale``
        while V is empty); with new_columns="orthogonal", orthonormal and orthogonal to span(V)."""
        v = self.v.detach().double()
        draw = torch.randn(self.in_features, count, generator=self.generator, dtype=torch.float64)
        draw = draw.to(v.device)
        scale = (v.norm(dim=0).mean().item() if v.shape[1] else 0.0) or self.init_scale
        if self.new_columns == "random":
            return (draw / draw.norm(dim=0) * scale).to(self.v.dtype)
        if v.shape[1]:
            basis = torch.linalg.qr(v).Q
            for _ in range(2):  # twice: orthogonal to rounding
                draw -= basis @ (basis.T @ draw)
        directions = torch.linalg.qr(draw).Q
        return (directions * scale).to(self.v.dtype)

    # -- state dict ----------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, int]:
        return {"rank": self.rank, "buffer": self.buffer}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.rank, self.buffer = int(state["rank"]), int(state["buffer"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Resize the factors to the checkpoint's before the values are copied in."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and prefix + "u" in state_dict:
            self.set_extra_state(extra)
            k = state_dict[prefix + "u"].shape[1]
            resize_parameter(self.u, self.u.new_zeros(self.out_features, k))
            resize_parameter(self.v, self.v.new_zeros(self.in_features, k))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        waiting = f", allocated={self.columns}" if self.columns > self.active_rank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, buffer={self.buffer}, active={self.active_rank}/"
                f"{self.full_rank}{waiting}, bias={self.bias is not None}")


class InRankLinear(LowRankLinear):
    """Vanilla InRank: y = x (W_0 + U Vᵀ)ᵀ + bias, with W_0 (out, in) frozen (a buffer).

    The cumulative update W − W_0 is exactly U Vᵀ: its rank is what the rule watches. Options
    as LowRankLinear. ``from_linear`` starts from an nn.Linear: W_0 = its weight, U Vᵀ = 0
    (with new_columns="orthogonal" or "random"), so the function is unchanged.
    """

    def __init__(self, in_features: int, out_features: int, **options: Any):
        super().__init__(in_features, out_features, **options)
        self.register_buffer("weight0", self.u.new_zeros(out_features, in_features))

    def _start_from(self, weight: torch.Tensor) -> None:
        self.weight0.copy_(weight)

    @property
    def weight(self) -> torch.Tensor:
        """W_0 + U Vᵀ, (out, in)."""
        return self.weight0 + self.product()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class InRankEfficientLinear(LowRankLinear):
    """Efficient InRank: y = (x V) Uᵀ + bias; the whole weight is U Vᵀ, trained from scratch.

    Stage 1 (rank search): rank + buffer active columns, grown by the controller. Stage 2:
    :meth:`truncate` keeps the top ``rank`` directions, drops the buffer; training continues at
    that fixed rank. The forward never forms the dense weight: (in + out)·k multiply-adds per
    input row instead of in·out. Options as LowRankLinear (rank + buffer ≥ 1). Built directly,
    U is random so that U Vᵀ has nn.Linear's entry scale; ``from_linear`` starts from the best
    rank-k approximation of the linear's weight (balanced factors U S^½, V S^½, k = rank +
    buffer): from scratch when the linear is freshly initialised, the model's own random
    initialisation restricted to rank k. With new_columns="kaiming" both start as the official
    code's: all max_rank columns Kaiming-uniform, the dense init ignored.
    """

    def __init__(self, in_features: int, out_features: int, **options: Any):
        super().__init__(in_features, out_features, **options)
        k = self.active_rank
        if k == 0:
            raise ValueError("rank + buffer must be ≥ 1 for InRankEfficientLinear (its whole "
                             "weight is U Vᵀ)")
        if self.new_columns == "kaiming":
            return  # the preallocated Kaiming factors, as the official code starts
        with torch.no_grad():  # entries of U Vᵀ with nn.Linear's std 1/sqrt(3·in)
            self.u.normal_(0.0, 1.0 / (self.init_scale * math.sqrt(3 * k)),
                           generator=self.generator)

    def _start_from(self, weight: torch.Tensor) -> None:
        """The best rank-k approximation of ``weight`` (ours), or the preallocated Kaiming
        factors untouched and a zero bias (new_columns="kaiming": the official code ignores the
        dense init)."""
        if self.new_columns == "kaiming":
            if self.bias is not None:
                self.bias.zero_()
            return
        svd = batched_svd(weight[None], compute="topk", k=self.active_rank)
        root = svd.S[0].sqrt()
        resize_parameter(self.u, svd.U[0] * root)
        resize_parameter(self.v, svd.Vh[0].T * root)

    @property
    def weight(self) -> torch.Tensor:
        """U Vᵀ, (out, in)."""
        return self.product()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors()
        return F.linear(F.linear(x, v.T), u, self.bias)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value!r}; must be an int {bound}")
