"""Host copies of live parameters: what the training thread hands to the writer."""

from __future__ import annotations

import torch


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy, float32 (float64 kept), detached from the live parameter."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(device="cpu", dtype=dtype, copy=True)
