"""The matrix rules: which weight tensors are recorded, under which name, and how each becomes
an (out, in) matrix.

One implementation for every source of weights. A source describes each tensor it holds as a
:class:`Candidate` (its name, shape, dtype, the role it plays in its layer, whether it trains,
its tied aliases); :func:`choose` applies the rules and returns the stored descriptions
(MatrixSpec); :func:`as_matrix` turns the tensor itself into the stored (m, n) matrix. The live
Recorder describes a model's modules (spectra.capture.selection); a checkpoint importer
describes a state dict and what its config says about the layers.

Orientation: every matrix is stored as (out, in), the map's output side first, so that its left
singular vectors live in the output space and its right ones in the input space whatever the
layer type (docs/matrices.md):

    layer               tensor as the module holds it     stored matrix
    "linear"            (out, in)          nn.Linear      as is
    "transposed_linear" (in, out)          transformers' Conv1D (GPT-2)   transposed
    "conv"              (out, in/g, k...)  nn.ConvNd      (out, in/g · k...)
    "conv_transpose"    (in, out/g, k...)  nn.ConvTransposeNd             (out, in/g · k...)
    "embedding"         (num, dim)         nn.Embedding   as is: a table, one row per entry
    "raw"               any ≥2-D           a Parameter of another module  (shape[0], rest),
                                                          leading singleton dims dropped

The rules:
- tensors with fewer than two dimensions (biases, norms) are never candidates;
- embeddings only with ``embeddings=True`` or when an ``include`` pattern names them;
- "raw" tensors whose first dimension is 1 (a ViT's cls_token (1, 1, d), a position table
  (1, N, d)) only when an ``include`` pattern names them;
- parts of a recorded layer (an adapter's factors and frozen base, the parameters behind a
  computed weight) only when an ``include`` pattern names them;
- frozen tensors (``trainable`` False) not with ``trainable_only=True`` (the default);
- ``exclude`` patterns drop what they name; patterns are shell-style (fnmatch) and match a
  tensor's name or any of its tied aliases;
- a tensor used by several layers (tied weights) is one candidate, named by :func:`tie_name`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spectra.store import MatrixSpec

LAYERS = ("linear", "transposed_linear", "conv", "conv_transpose", "embedding", "raw")
MAPS = ("linear", "transposed_linear", "conv", "conv_transpose")  # layers that are linear maps
_KINDS = {"linear": "linear", "transposed_linear": "linear", "conv": "conv",
          "conv_transpose": "conv", "embedding": "embedding", "raw": "matrix"}
_LAYOUTS = {"transposed_linear": "transposed: the parameter is (in, out) (transformers Conv1D)",
            "conv_transpose": "ConvTranspose kernel (in, out/groups, k...) read as "
                              "(out, in/groups·k...)"}


@dataclass(frozen=True)
class Candidate:
    """One tensor a source could record, as the rules see it.

    name: the name users look for (wrappers' prefixes such as ``_orig_mod.`` removed).
    shape: the tensor's own shape; dtype: its dtype name ("float32", "bfloat16", ...).
    layer: its role, one of LAYERS (decides the orientation).
    kind: the stored kind when it is not the layer's ("effective" for a computed weight).
    trainable: False for a frozen tensor; None when the source cannot tell (kept).
    aliases: the other names of the same tensor (tied weights).
    groups: a convolution's groups (conv_transpose needs it for its orientation).
    part: True for a part of another recorded matrix (adapter factor, base weight).
    attrs: notes stored with the matrix (JSON-serialisable).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: str = "raw"
    kind: str | None = None
    trainable: bool | None = True
    aliases: tuple[str, ...] = ()
    groups: int = 1
    part: bool = False
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"{self.name}: layer={self.layer!r}; accepted: {LAYERS}")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def choose(candidates: Sequence[Candidate], *, include: str | Sequence[str] | None = None,
           exclude: str | Sequence[str] | None = None, embeddings: bool = False,
           trainable_only: bool = True, source: str = "the model") -> list[MatrixSpec]:
    """The specs of the candidates to record, in the candidates' order (rules: module docstring).

    Raises ValueError naming the patterns at fault if an include pattern selects nothing, or if
    nothing remains; ``source`` names what the candidates came from in those messages.
    """
    include, exclude = patterns(include, "include"), patterns(exclude, "exclude")
    names = [c.name for c in candidates]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"{source}: several tensors would be recorded as {clashes}")
    chosen: list[MatrixSpec] = []
    matched: set[str] = set()
    frozen_hits: set[str] = set()
    for c in candidates:
        hits = [p for p in include if any(fnmatch.fnmatchcase(n, p) for n in c.names)]
        if include and not hits:
            continue
        if not hits and (c.part or (c.layer == "embedding" and not embeddings)
                         or _leading_singleton(c)):
            continue
        if trainable_only and c.trainable is False:
            frozen_hits.update(hits)
            continue
        if any(fnmatch.fnmatchcase(n, p) for n in c.names for p in exclude):
            continue
        matched.update(hits)
        chosen.append(spec(c))
    unmatched = [p for p in include if p not in matched]
    if unmatched:
        frozen = [p for p in unmatched if p in frozen_hits]
        why = (f"; {frozen} name only frozen parameters (pass trainable_only=False to record "
               "them)") if frozen else ""
        raise ValueError(f"include patterns {unmatched} match no matrix of {source}{why}; its "
                         f"matrices: {[c.name for c in candidates]}")
    if not chosen:
        raise ValueError(f"{source} has no weight matrices to record (include={include or None}, "
                         f"exclude={exclude or None}, embeddings={embeddings}, "
                         f"trainable_only={trainable_only}); candidates: "
                         f"{[c.name for c in candidates]}")
    return chosen


def spec(c: Candidate) -> MatrixSpec:
    """The stored description of candidate ``c``."""
    shape = tuple(as_matrix(torch.empty(c.shape, device="meta"), c.layer, c.groups).shape)
    attrs = dict(c.attrs)
    if c.layer in _LAYOUTS:
        attrs["layout"] = _LAYOUTS[c.layer]
    if c.aliases:
        attrs["tied_to"] = list(c.aliases)
    return MatrixSpec(name=c.name, shape=shape, original_shape=tuple(c.shape),
                      kind=c.kind or _KINDS[c.layer], dtype=c.dtype, attrs=attrs)


def as_matrix(tensor: torch.Tensor, layer: str, groups: int = 1) -> torch.Tensor:
    """``tensor`` as the stored (out, in) matrix of a ``layer`` tensor (table: module docstring).

    A view where the layout allows one, else a copy; works on any device, meta included.
    """
    if layer == "transposed_linear":
        return tensor.T
    if layer == "conv_transpose":
        return _conv_transpose_matrix(tensor, groups)
    if layer == "raw":
        while tensor.ndim > 2 and tensor.shape[0] == 1:
            tensor = tensor[0]
    return tensor.reshape(tensor.shape[0], -1)


def tie_name(names: Sequence[str], layers: Sequence[str]) -> int:
    """Index of the name a tied tensor is recorded under: the first one used as a linear map
    (an output head tied to its embedding is recorded as the head), else the first."""
    return next((i for i, layer in enumerate(layers) if layer in MAPS), 0)


def clean_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components torch.compile inserts."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def patterns(value: str | Sequence[str] | None, arg: str) -> list[str]:
    """``include=`` / ``exclude=`` as a list of patterns."""
    if value is None:
        return []
    found = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in found):
        raise ValueError(f"{arg}= must be a pattern string or a list of them; got {value!r}")
    return found


def _conv_transpose_matrix(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(in, out/g, k...) → (out, in/g·k...): row o = g·(out/g) + j holds, for each input channel
    i of group g and each kernel offset, the weight from input i to output o."""
    in_channels, out_per_group, *kernel = w.shape
    if in_channels % groups:
        raise ValueError(f"ConvTranspose kernel {tuple(w.shape)}: {in_channels} input channels "
                         f"do not split into groups={groups}")
    grouped = w.reshape(groups, in_channels // groups, out_per_group, *kernel).transpose(1, 2)
    return grouped.reshape(groups * out_per_group, -1)


def _leading_singleton(c: Candidate) -> bool:
    return c.layer == "raw" and c.shape[0] == 1
