"""Model surgery shared by the low-rank methods: replace a module, resize a parameter, count
what trains.

- ``replace_module(model, path, new)``: put ``new`` at module path ``path`` (in place).
- ``resize_parameter(param, value)``: give a Parameter new values *and shape* while keeping the
  Python object, so an optimizer that holds it keeps holding it (its state is remapped by
  spectra.methods.optim_state).
- ``trainable_count(model)``: the number of parameter entries with ``requires_grad``.
"""

from __future__ import annotations

import torch
from torch import nn


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at module path ``path`` of ``model`` (in place); return the module it replaced."""
    if not path:
        raise ValueError("path is empty: the root module cannot be replaced in place")
    parent, _, name = path.rpartition(".")
    old = model.get_submodule(path)
    setattr(model.get_submodule(parent), name, new)
    return old


@torch.no_grad()
def resize_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the values (and shape) of ``value``, keeping the Python object.

    ``torch.utils.swap_tensors`` rather than ``param.data = value``: the latter keeps the
    autograd accumulator of the old shape, which breaks backward while any graph built before
    the resize is still alive. The gradient is cleared (it has the old shape). ``value`` must
    not be a view of ``param`` (clone a slice first)."""
    fresh = nn.Parameter(value.detach().to(param.dtype).contiguous(),
                         requires_grad=param.requires_grad)
    torch.utils.swap_tensors(param, fresh)
    param.grad = None


def trainable_count(model: nn.Module) -> int:
    """Entries of the parameters of ``model`` that have ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
