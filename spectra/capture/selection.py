"""Which matrices of a model the Recorder records, and how to read each as an (m, n) tensor.

Rules:
- every parameter with two or more dimensions, once (tied weights under their first name);
  kernels of more than two dimensions (conv: out, in, k...) are read as (shape[0], rest);
- 1-D parameters (biases, norms) are never recorded;
- embeddings (nn.Embedding, nn.EmbeddingBag) only with ``embeddings=True`` or when an
  ``include`` pattern names them;
- a module whose ``weight`` is a tensor but not a Parameter (a low-rank layer, a
  torch.nn.utils.parametrize'd layer) is recorded through that dense effective weight, and its
  own parameters (the factors) are not;
- ``include`` / ``exclude`` are shell-style patterns (fnmatch) on parameter names.

Each matrix is read through its module path and attribute name at every snapshot, so a layer
that changes its parametrisation in place (OIALR converting U Σ Vᵀ) or a module replaced in its
parent keeps being recorded, as long as the (m, n) shape stays the same.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from spectra.store import MatrixSpec

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class RecordedMatrix:
    """One matrix to record: its stored description and how to read its current value."""

    spec: MatrixSpec
    read: Callable[[], torch.Tensor]  # → (m, n) view of the live weight (no copy, no grad)


def select_matrices(model: nn.Module, *, include: str | Sequence[str] | None = None,
                    exclude: str | Sequence[str] | None = None,
                    embeddings: bool = False) -> list[RecordedMatrix]:
    """The matrices of ``model`` to record, in model order. Raises ValueError if none remain."""
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    candidates = _effective_weights(model) + _parameter_matrices(model, skip=_effective_prefixes(model))
    candidates.sort(key=lambda c: c[0])
    chosen, matched = [], set()
    for _, names, kind, read, original_shape, dtype in candidates:
        hits = [p for p in include if any(fnmatch.fnmatchcase(n, p) for n in names)]
        matched.update(hits)
        if include and not hits:
            continue
        if kind == "embedding" and not (embeddings or hits):
            continue
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude):
            continue
        m = original_shape[0]
        n = int(torch.Size(original_shape[1:]).numel())
        spec = MatrixSpec(name=names[0], shape=(m, n), original_shape=original_shape, kind=kind,
                          dtype=str(dtype).removeprefix("torch."))
        chosen.append(RecordedMatrix(spec=spec, read=read))
    unmatched = [p for p in include if p not in matched]
    if unmatched:
        raise ValueError(f"include patterns {unmatched} match no matrix of "
                         f"{type(model).__name__}; its matrices: {[c[1][0] for c in candidates]}")
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no weight matrices to record "
                         f"(include={include or None}, exclude={exclude or None}, "
                         f"embeddings={embeddings}); candidates: {[c[1][0] for c in candidates]}")
    return chosen


def _parameter_matrices(model: nn.Module, skip: list[str]) -> list[tuple]:
    """(order, names, kind, read, original_shape, dtype) for each ≥2-D parameter, tied ones
    once."""
    owners = dict(model.named_modules())
    by_id: dict[int, list[str]] = {}
    order: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        if p.ndim < 2 or any(_under(name, prefix) for prefix in skip):
            continue
        by_id.setdefault(id(p), []).append(name)
        order.setdefault(id(p), i)
        params[id(p)] = p
    out = []
    for key, names in by_id.items():
        p = params[key]
        path, _, attr = names[0].rpartition(".")
        out.append((order[key], names, _kind(owners[path]), _reader(model, path, attr),
                    tuple(p.shape), p.dtype))
    return out


def _effective_weights(model: nn.Module) -> list[tuple]:
    """(order, names, kind, read, original_shape, dtype) for modules exposing a dense effective
    weight."""
    out = []
    order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    for prefix in _effective_prefixes(model):
        module = model.get_submodule(prefix)
        first_param = min((i for n, i in order.items() if _under(n, prefix)), default=-1)
        name = f"{prefix}.weight" if prefix else "weight"
        weight = _effective(module)
        out.append((first_param, [name], "effective", _reader(model, prefix, "weight"),
                    tuple(weight.shape), weight.dtype))
    return out


def _effective_prefixes(model: nn.Module) -> list[str]:
    """Module paths whose ``weight`` is a ≥2-D tensor that is not a Parameter (outermost only)."""
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(_under(name, p) for p in prefixes):
            continue
        weight = _effective(module)
        if weight is not None:
            prefixes.append(name)
    return prefixes


def _under(name: str, prefix: str) -> bool:
    """True if the dotted ``name`` is ``prefix`` or lies inside module ``prefix`` ("" = root)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _effective(module: nn.Module) -> torch.Tensor | None:
    if "weight" in module._parameters:
        return None
    with torch.no_grad():
        weight = getattr(module, "weight", None)
    ok = isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter) and weight.ndim >= 2
    return weight if ok else None


def _kind(module: nn.Module) -> str:
    if isinstance(module, _EMBEDDINGS):
        return "embedding"
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "matrix"


def _reader(model: nn.Module, path: str, attr: str) -> Callable[[], torch.Tensor]:
    """Reads ``model.<path>.<attr>`` afresh at each call, as an (m, n) detached tensor."""
    def read() -> torch.Tensor:
        with torch.no_grad():
            weight = getattr(model.get_submodule(path), attr)
        return weight.detach().reshape(weight.shape[0], -1)
    return read


def _patterns(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{arg}= must be a pattern string or a list of them; got {value!r}")
    return patterns
