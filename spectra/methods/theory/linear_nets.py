"""The toy setting of docs/architecture.md §5: a deep linear network, a teacher, whitened inputs.

    y = W_D ··· W_1 x,   x ∈ R^dim, hidden width ``width``, each W_l = α·(random orthogonal)
    T = U diag(s) Vᵀ,    s distinct (padded with zeros to dim), U, V random orthogonal
    X (n, dim) with XᵀX / n = I, so that the mean-squared loss ½·mean_k ‖W x_k − T x_k‖² is
    exactly ½‖W − T‖²_F, with W = W_D ··· W_1 the end-to-end product.

Everything is float64: the networks are tiny and it removes precision questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DTYPE = torch.float64


class EndToEnd(nn.Module):
    """A parameterless view whose ``weight`` is the product W_D ··· W_1 of ``layers``.

    The layers are held in a tuple, which nn.Module does not register, so the Recorder records
    this module through its dense effective weight *and* each layer's own weight as usual.
    """

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self._layers = (layers,)

    @property
    def weight(self) -> torch.Tensor:
        """(dim, dim) float64, differentiable in the layers' weights."""
        layers = self._layers[0]
        product = layers[0].weight
        for layer in layers[1:]:
            product = layer.weight @ product
        return product


class DeepLinearNet(nn.Module):
    """y = W_D ··· W_1 x: ``depth`` bias-free linear maps dim → width → ... → width → dim.

    Recorded matrices: ``layers.<l>.weight`` (l = 0 is W_1) and ``product.weight`` (W).
    """

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth={depth!r}; must be an int >= 2 (a product of matrices)")
        if width < dim:
            raise ValueError(f"width={width!r}; must be >= dim={dim} so the product can have "
                             "full rank")
        sizes = [dim] + [width] * (depth - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, bias=False, dtype=DTYPE)
                                    for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        self.product = EndToEnd(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, dim) → (batch, dim)."""
        return x @ self.product.weight.T


@dataclass(frozen=True)
class Teacher:
    """T = u diag(s) vᵀ. ``u``, ``v`` (dim, dim) orthogonal; ``s`` (dim,) descending, the
    teacher's spectrum padded with zeros; ``rank`` = number of nonzero s."""

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray

    @property
    def rank(self) -> int:
        return int(np.count_nonzero(self.s))

    @property
    def matrix(self) -> np.ndarray:
        """(dim, dim) float64."""
        return (self.u * self.s) @ self.v.T

    def to_json(self) -> dict[str, list]:
        return {"u": self.u.tolist(), "s": self.s.tolist(), "v": self.v.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> "Teacher":
        return cls(*(np.asarray(data[key], dtype=np.float64) for key in ("u", "s", "v")))


def random_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) float64 with orthonormal columns (rows ≥ cols) or rows (rows < cols),
    Haar-distributed (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    size = max(rows, cols)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    return q[:rows, :cols]


def make_teacher(spectrum: Sequence[float], dim: int, generator: torch.Generator) -> Teacher:
    """A teacher with the given distinct, positive singular values and random bases."""
    s = np.asarray(spectrum, dtype=np.float64)
    if s.ndim != 1 or not 1 <= s.size <= dim:
        raise ValueError(f"teacher spectrum {list(spectrum)}: must hold 1 to dim={dim} values")
    if np.any(s <= 0) or np.any(np.diff(s) >= 0):
        raise ValueError(f"teacher spectrum {list(spectrum)}: must be positive and strictly "
                         "decreasing (distinct singular values)")
    u = random_orthogonal(dim, dim, generator).numpy()
    v = random_orthogonal(dim, dim, generator).numpy()
    return Teacher(u=u, s=np.pad(s, (0, dim - s.size)), v=v)


def whitened_inputs(samples: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(samples, dim) float64 X with XᵀX / samples = I (to rounding): √n times the Q factor
    of a Gaussian matrix."""
    if samples < dim:
        raise ValueError(f"samples={samples!r}; need at least dim={dim} to whiten")
    q, _ = torch.linalg.qr(torch.randn(samples, dim, generator=generator, dtype=DTYPE))
    return q * samples**0.5


@torch.no_grad()
def init_orthogonal(net: DeepLinearNet, alpha: float, generator: torch.Generator,
                    aligned_to: Teacher | None = None) -> None:
    """Set every W_l = α·(random orthogonal): square layers orthogonal, the first and last
    semi-orthogonal. With ``aligned_to``, the same kind of layers chosen so that the product is
    α^D·u vᵀ: every mode starts aligned with the teacher at strength α^D (Saxe et al. 2014)."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r}; the init scale must be > 0")
    layers = [layer.weight for layer in net.layers]
    if aligned_to is None:
        for w in layers:
            w.copy_(alpha * random_orthogonal(*w.shape, generator))
        return
    width, dim = layers[0].shape
    frame = random_orthogonal(width, dim, generator)  # the hidden directions the modes use
    layers[0].copy_(alpha * frame @ torch.from_numpy(aligned_to.v).T)
    for w in layers[1:-1]:
        w.copy_(alpha * torch.eye(width, dtype=DTYPE))
    layers[-1].copy_(alpha * torch.from_numpy(aligned_to.u) @ frame.T)
