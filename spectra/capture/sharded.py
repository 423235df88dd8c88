"""Recording a sharded model: every rank hands its shards to the writer rank, which assembles
the full matrices.

Under FSDP2 (``fully_shard``), and for any model whose parameters are DTensors, no rank holds a
whole matrix. At each snapshot every rank copies its local shards to the host and the writer
rank (global rank 0) gathers them over a gloo process group of the Recorder's own, with a
bounded timeout, and places each shard at its offset (Shard(d) and Replicate placements, any
mesh). Only the writer rank ever holds full matrices; the others hold one shard at a time.
Gathering to one writer was measured against every rank writing its own rows of the zarr arrays
(benchmarks/bench_sharded.py; the numbers and the choice: docs/distributed.md).

Every collective carries the writer's state first: when the writer has failed, every rank
raises the same error at the same snapshot instead of waiting. A rank that stops taking part
(it crashed, or it skipped a snapshot) makes the others raise after ``timeout`` seconds, never
hang.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spectra.capture.host import host_copy
from spectra.capture.selection import RecordedMatrix

WRITER = 0  # the global rank that writes the store


def is_sharded(model: nn.Module) -> bool:
    """True if torch.distributed runs with several ranks and some parameter is a DTensor."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(_is_dtensor(p) for p in model.parameters())


class ShardGather:
    """The collectives of a sharded recording; every rank makes the same calls in the same order.

    Args:
        matrices: this rank's selection (checked to be the same on every rank).
        timeout: seconds any collective waits for the other ranks before raising.
    """

    def __init__(self, matrices: Sequence[RecordedMatrix], timeout: float):
        self.timeout = timeout
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        self._layouts: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        ours = [(m.spec.name, m.spec.shape) for m in matrices]
        everyone = self._all_gather_object(ours, "comparing the recorded matrices")
        for rank, theirs in enumerate(everyone):
            if theirs != ours:
                raise ValueError(f"rank {rank} records {_diff(theirs, ours)} where rank "
                                 f"{self.rank} does not: every rank must build the same model "
                                 "and pass the same include/exclude")

    @property
    def writer(self) -> bool:
        return self.rank == WRITER

    def share(self, value: Any, what: str) -> Any:
        """The writer's ``value`` on every rank (a small picklable object)."""
        box = [value if self.writer else None]
        self._run(lambda: dist.broadcast_object_list(box, src=WRITER, group=self.group), what)
        return box[0]

    def collect(self, matrices: Sequence[RecordedMatrix], step: int) -> dict[str, torch.Tensor] | None:
        """The full (m, n) host copies of ``matrices`` on the writer (None on other ranks)."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, matrix in enumerate(matrices):
                full = [self._full(t, (i, j), matrix.spec.name, step)
                        for j, t in enumerate(matrix.tensors())]
                if self.writer:
                    out[matrix.spec.name] = host_copy(matrix.combine(full))
        return out if self.writer else None

    def _full(self, tensor: torch.Tensor, key: tuple[int, int], name: str,
              step: int) -> torch.Tensor | None:
        """The whole tensor on the writer, assembled from every rank's shard; None elsewhere."""
        if not _is_dtensor(tensor):
            return tensor
        local = host_copy(tensor.to_local()).contiguous()
        layouts = self._layouts.get(key)
        if layouts is None:
            layouts = self._all_gather_object(_layout(tensor, name),
                                              f"the shard layout of {name!r}")
            self._layouts[key] = layouts
        size = max(_numel(shape) for shape, _ in layouts)
        padded = torch.zeros(size, dtype=local.dtype)
        padded[:local.numel()] = local.reshape(-1)
        received = [torch.empty_like(padded) for _ in range(self.world)] if self.writer else None
        self._run(lambda: dist.gather(padded, received, dst=WRITER, group=self.group),
                  f"the shards of {name!r} at step {step}")
        if not self.writer:
            return None
        full = torch.empty(tuple(tensor.shape), dtype=local.dtype)
        for (shape, offset), flat in zip(layouts, received):
            where = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            full[where] = flat[:_numel(shape)].view(shape)
        return full

    def _all_gather_object(self, value: Any, what: str) -> list[Any]:
        box: list[Any] = [None] * self.world
        self._run(lambda: dist.all_gather_object(box, value, group=self.group), what)
        return box

    def _run(self, collective, what: str) -> None:
        try:
            collective()
        except RuntimeError as exc:  # gloo: a timeout, or a peer that closed its connection
            raise RuntimeError(
                f"spectra: rank {self.rank} gave up on {what}: not every rank took part within "
                f"{self.timeout:g} s (a rank failed or stopped recording). Under sharded "
                f"training every rank must create, start and step the Recorder alike "
                f"({exc})") from exc


def _layout(tensor: torch.Tensor, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of DTensor ``tensor``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(p.is_partial() for p in tensor.placements):
        raise ValueError(f"{name!r} is a DTensor with a Partial placement ({tensor.placements}); "
                         "only Shard and Replicate parameters can be recorded")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                          tensor.placements)
    return tuple(shape), tuple(offset)


def _is_dtensor(tensor: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for s in shape:
        count *= s
    return count


def _diff(theirs: list, ours: list) -> list:
    return sorted(set(map(tuple, theirs)) ^ set(map(tuple, ours)))[:5]
