"""What a method's schedule counts: optimizer steps, or forward calls as the official code does.

Our controllers count optimizer steps: the training loop calls ``controller(step)`` after each
one, so evaluation passes and gradient-accumulation micro-batches do not advance a schedule.
The official InRank and OIALR code count forward calls instead, and act *before* the forward
that reaches a scheduled count. :class:`ForwardClock` reproduces that with a forward pre-hook:
it counts the calls of one module and hands each count to ``on_tick`` before the forward runs.

- official InRank (``in_rank_efficient.py``): each layer counts every call of its own forward,
  in training and evaluation alike (``training_only=False``);
- official OIALR (``OIALRModel.forward``): the wrapped model counts its calls in training mode
  (``training_only=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

COUNTS = ("steps", "forwards")


class ForwardClock:
    """Counts the forward calls of ``module`` (only in training mode if ``training_only``)
    and calls ``on_tick(count)`` before each counted forward runs. ``count`` is the number of
    counted calls so far (1 at the first); ``state_dict``/``load_state_dict`` save it."""

    def __init__(self, module: nn.Module, on_tick: Callable[[int], Any], *,
                 training_only: bool):
        self.count = 0
        self.on_tick, self.training_only = on_tick, training_only
        self.handle = module.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self.training_only and not module.training:
            return
        self.count += 1
        self.on_tick(self.count)

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["count"])


def check_count(count: Any) -> None:
    """A clear error for a ``count`` option that is not one of COUNTS."""
    if count not in COUNTS:
        raise ValueError(f"count={count!r}; accepted: {COUNTS} (what the schedule counts)")
