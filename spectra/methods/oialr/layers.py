"""OIALR layers: a Linear or Conv2d weight held as U Σ Vᵀ with U, V frozen and Σ trained.

A layer of out × in weight W (a conv kernel (out, in/groups, kh, kw) read as the matrix
(out, in/groups·kh·kw)) becomes

    W = U Σ Vᵀ,   U (out, k) and V (in, k) frozen buffers with orthonormal columns,
                  Σ (k, k) the trained parameter (a full matrix, not only a diagonal),

starting at the reduced SVD of W (k = min(out, in), Σ = diag(σ)), so the function is unchanged.
The dense effective weight is the ``weight`` property (a plain tensor, not a Parameter): the
Recorder and everything else read it as they read a full-rank layer's weight. The bias stays a
Parameter (the same object as the dense layer's, so it keeps training and keeps its optimizer
state). Two in-place operations serve the OIALR controller:

- ``rotate()``: SVD of Σ = P diag(s) Qᵀ; U ← U P, V ← V Q, Σ ← diag(s). W is unchanged.
- ``truncate(rank)``: rotate, then keep the top ``rank`` singular triplets (the best rank-r
  approximation of W); Σ is resized in place (spectra.methods.modules.resize_parameter, the
  optimizer keeps its reference) and the returned StateMap carries its optimizer state.

SVDs run through spectra.core.linalg in float64; U, V, Σ are stored in the dense layer's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from spectra.core.linalg import batched_svd
from spectra.methods.modules import resize_parameter
from spectra.methods.optim_state import StateMap


class SVDLayer(nn.Module):
    """Shared state of the U Σ Vᵀ layers: buffers ``u`` (m, k), ``v`` (n, k), Parameter
    ``sigma`` (k, k), optional Parameter ``bias`` (m,). Subclasses define ``forward`` and the
    shape of ``weight``."""

    def __init__(self, matrix: torch.Tensor, bias: nn.Parameter | None):
        super().__init__()
        svd = batched_svd(matrix.detach()[None], compute="full")
        dtype = matrix.dtype
        self.register_buffer("u", svd.U[0].to(dtype).contiguous())
        self.register_buffer("v", svd.Vh[0].T.to(dtype).contiguous())
        self.sigma = nn.Parameter(torch.diag(svd.S[0]).to(dtype))
        self.bias = bias

    @property
    def rank(self) -> int:
        """k, the inner dimension of U Σ Vᵀ."""
        return self.sigma.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        """U Σ Vᵀ, (m, n), differentiable in Σ."""
        return self.u @ self.sigma @ self.v.T

    @torch.no_grad()
    def rotate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonalise Σ = P diag(s) Qᵀ (s descending) and absorb P, Q into U, V.

        W = U Σ Vᵀ is unchanged (to rounding). Returns P, Q (k, k) float64, which the caller
        needs to carry the optimizer state of Σ into the new coordinates (Σ' = Pᵀ Σ Q).
        """
        svd = batched_svd(self.sigma.detach().double()[None], compute="full")
        p, s, q = svd.U[0], svd.S[0], svd.Vh[0].T
        self.u.copy_(self.u.double() @ p)
        self.v.copy_(self.v.double() @ q)
        self.sigma.copy_(torch.diag(s))
        return p, q

    def singular_values(self) -> torch.Tensor:
        """The singular values of Σ (those of W), descending, (k,) float64."""
        with torch.no_grad():
            return batched_svd(self.sigma.detach().double()[None], compute="values").S[0]

    @torch.no_grad()
    def truncate(self, rank: int) -> list[StateMap]:
        """Keep the top ``rank`` singular triplets of W: rotate (Σ diagonal), then the leading
        ``rank`` columns of U and V and the leading rank × rank block of Σ. Returns the
        StateMap of Σ (Σ' = P_rᵀ Σ Q_r) for spectra.methods.optim_state.remap_state."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank={rank}; must be in [1, {self.rank}] (ranks never grow)")
        p, q = self.rotate()
        self.u = self.u[:, :rank].contiguous()
        self.v = self.v[:, :rank].contiguous()
        resize_parameter(self.sigma, self.sigma[:rank, :rank].clone())
        return [StateMap(self.sigma, left=p[:, :rank], right=q[:, :rank])]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold a smaller rank than this layer: take its shapes first (Σ in
        # place, so an optimizer built before loading keeps training it).
        for name in ("u", "v"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], dtype=self.u.dtype,
                                                     device=self.u.device))
        if prefix + "sigma" in state_dict:
            resize_parameter(self.sigma, torch.zeros_like(state_dict[prefix + "sigma"],
                                                          device=self.sigma.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SVDLinear(SVDLayer):
    """A Linear layer y = x Wᵀ + b with W = U Σ Vᵀ (out_features × in_features).

    forward: (*, in_features) → (*, out_features). Uses x V Σᵀ Uᵀ when that is cheaper than
    the dense product (k (m + n + k) < m n), else builds W.
    """

    def __init__(self, in_features: int, out_features: int, matrix: torch.Tensor,
                 bias: nn.Parameter | None):
        if tuple(matrix.shape) != (out_features, in_features):
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}; expected "
                             f"(out_features, in_features) = ({out_features}, {in_features})")
        super().__init__(matrix, bias)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense effective weight U Σ Vᵀ, (out_features, in_features)."""
        return self.matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, m, n = self.rank, self.out_features, self.in_features
        if k * (m + n + k) < m * n:
            return F.linear(F.linear(F.linear(x, self.v.T), self.sigma), self.u, self.bias)
        return F.linear(x, self.matrix, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class SVDConv2d(SVDLayer):
    """A Conv2d whose kernel (out, in/groups, kh, kw) is the matrix U Σ Vᵀ
    (out, in/groups·kh·kw), reshaped. Only ``padding_mode="zeros"`` (the kernel is rebuilt
    densely at every forward)."""

    def __init__(self, conv: nn.Conv2d):
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r}; SVDConv2d supports 'zeros'")
        super().__init__(conv.weight.reshape(conv.out_channels, -1), conv.bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_shape = tuple(conv.weight.shape)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    @property
    def weight(self) -> torch.Tensor:
        """The dense effective kernel, (out_channels, in_channels/groups, kh, kw)."""
        return self.matrix.reshape(self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_shape[2:]}, "
                f"stride={self.stride}, padding={self.padding}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def to_svd_layer(layer: nn.Module) -> SVDLayer:
    """The U Σ Vᵀ form of a dense nn.Linear or nn.Conv2d (same function, full rank)."""
    if isinstance(layer, nn.Linear):
        return SVDLinear(layer.in_features, layer.out_features, layer.weight, layer.bias)
    if isinstance(layer, nn.Conv2d):
        return SVDConv2d(layer)
    raise TypeError(f"layer is a {type(layer).__name__}; accepted: nn.Linear, nn.Conv2d")
