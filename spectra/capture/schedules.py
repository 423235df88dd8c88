"""Snapshot schedules: which training steps the Recorder snapshots.

A schedule answers ``step in schedule`` for a step count (0 = when recording began, k = after the
k-th optimizer step). Step 0 is always snapshotted by the Recorder whatever the schedule says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Every ``n`` steps: 0, n, 2n, ..."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"every={self.n!r}; must be a positive int (steps between snapshots)")

    def __contains__(self, step: int) -> bool:
        return step % self.n == 0


@dataclass(frozen=True)
class LogSpaced:
    """Dense early, sparse late: steps round(10^(i/per_decade)) for i = 0, 1, ... (plus 0).

    With ``per_decade=10`` that is 0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, ...
    ``max_every`` adds every multiple of it, capping the gap late in training.
    """

    per_decade: int = 10
    max_every: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.per_decade, int) or self.per_decade < 1:
            raise ValueError(f"per_decade={self.per_decade!r}; must be a positive int")
        if self.max_every is not None and (not isinstance(self.max_every, int) or self.max_every < 1):
            raise ValueError(f"max_every={self.max_every!r}; must be a positive int or None")

    def __contains__(self, step: int) -> bool:
        if step <= 0:
            return step == 0
        if self.max_every is not None and step % self.max_every == 0:
            return True
        i = round(self.per_decade * math.log10(step))
        return any(round(10 ** (j / self.per_decade)) == step for j in (i - 1, i, i + 1) if j >= 0)


@dataclass(frozen=True)
class Steps:
    """An explicit, strictly increasing list of steps."""

    steps: tuple[int, ...]

    def __init__(self, steps: Iterable[int]):
        steps = tuple(int(s) for s in steps)
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise ValueError(f"schedule steps must strictly increase; got {steps[i - 1]} then "
                                 f"{steps[i]} at position {i}")
        if steps and steps[0] < 0:
            raise ValueError(f"schedule steps must be >= 0; got {steps[0]}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "_set", frozenset(steps))

    def __contains__(self, step: int) -> bool:
        return step in self._set


Schedule = Every | LogSpaced | Steps


def make_schedule(every: int | None = None, schedule: object = None) -> Schedule:
    """The schedule meant by the Recorder's ``every=`` / ``schedule=`` arguments.

    ``schedule`` may be a schedule object, ``"log"`` (LogSpaced()), or an iterable of steps.
    With neither argument, every step is snapshotted.
    """
    if every is not None and schedule is not None:
        raise ValueError("give either every= or schedule=, not both")
    if schedule is None:
        return Every(1 if every is None else every)
    if isinstance(schedule, Every | LogSpaced | Steps):
        return schedule
    if schedule == "log":
        return LogSpaced()
    if isinstance(schedule, str) or not isinstance(schedule, Iterable):
        raise ValueError(f"schedule={schedule!r}; accepted: 'log', an Every/LogSpaced/Steps "
                         "object, or a list of steps")
    return Steps(schedule)


def describe(schedule: Schedule) -> dict:
    """JSON-serialisable description, kept in the store's attrs."""
    if isinstance(schedule, Steps):
        return {"kind": "steps", "steps": list(schedule.steps)}
    fields = {k: v for k, v in vars(schedule).items() if not k.startswith("_")}
    return {"kind": type(schedule).__name__.lower(), **fields}
