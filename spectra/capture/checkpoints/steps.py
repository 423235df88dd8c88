"""The training step of each checkpoint: given by the caller, or stated by the checkpoint's name
or its own metadata. Two sources that disagree, a checkpoint with no step, or two checkpoints at
one step are errors that say how to resolve them (pass the steps).

Names state a step with a keyword (``checkpoint-500``, ``epoch=0-step=500``, ``step_500``,
``global_step500``, ``iter_500``, ``ckpt-500``) or as a trailing number (``model_000500.pt``,
``500.safetensors``; a number after ``epoch`` is not a step).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_KEYWORD = re.compile(r"(?<![a-z])(global_step|steps?|iterations?|iters?|it|checkpoint|ckpt)"
                      r"[-_=]?(\d+)(?!\d)", re.IGNORECASE)
_TRAILING = re.compile(r"(?:^|[-_=.])(\d+)$")
_HOW_TO = ("pass the steps, one per checkpoint in the order given: --steps 0,500,1000 on the "
           "command line, steps=[0, 500, 1000] in Python")


@dataclass(frozen=True)
class Stepped:
    """A checkpoint with its step and where the step came from."""

    path: Path
    step: int
    source: str


def name_steps(path: Path) -> dict[str, int]:
    """The steps the name of ``path`` states, by the part of the name that states each."""
    stem = path.name if path.is_dir() else path.stem
    found = {f"its name ({m.group(0)})": int(m.group(2)) for m in _KEYWORD.finditer(stem)}
    if found:
        return found
    trailing = _TRAILING.search(stem)
    if trailing and not stem[:trailing.start(1)].rstrip("-_=.").lower().endswith("epoch"):
        return {f"its name ({stem})": int(trailing.group(1))}
    return {}


def resolve(paths: Sequence[Path], stated: Sequence[dict[str, int]],
            given: Sequence[int] | None) -> list[Stepped]:
    """The step of each of ``paths``: ``given`` (one per path) if not None, else the one its
    ``stated`` steps (name and metadata, by source) agree on. Raises ValueError otherwise."""
    if given is not None:
        return [Stepped(p, s, "given") for p, s in zip(paths, _checked(given, paths))]
    resolved, unknown = [], []
    for path, sources in zip(paths, stated):
        values = set(sources.values())
        if len(values) > 1:
            said = "; ".join(f"{where} says {step}" for where, step in sources.items())
            raise ValueError(f"{path}: its steps disagree ({said}); {_HOW_TO}")
        if not values:
            unknown.append(str(path))
            continue
        where, step = next(iter(sources.items()))
        resolved.append(Stepped(path, step, where))
    if unknown:
        raise ValueError(f"cannot tell the step of {len(unknown)} checkpoint(s) {unknown[:3]}: "
                         "neither the name (checkpoint-500, step=500, model_000500.pt) nor the "
                         f"file's metadata states one; {_HOW_TO}")
    return resolved


def in_order(checkpoints: Sequence[Stepped]) -> list[Stepped]:
    """``checkpoints`` sorted by step. Raises ValueError if two share a step."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    for a, b in zip(ordered, ordered[1:]):
        if a.step == b.step:
            raise ValueError(f"{a.path} ({a.source}) and {b.path} ({b.source}) are both at step "
                             f"{a.step}: pass only one of them (Lightning's last.ckpt repeats "
                             f"the last step), or {_HOW_TO}")
    return ordered


def _checked(given: Sequence[int], paths: Sequence[Path]) -> list[int]:
    steps = list(given)
    if len(steps) != len(paths):
        raise ValueError(f"steps: {len(steps)} given for {len(paths)} checkpoints "
                         f"({[str(p) for p in paths][:4]}{' ...' if len(paths) > 4 else ''}); "
                         "give one step per checkpoint, in the order given")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0]
    if bad:
        raise ValueError(f"steps: {bad[:3]} are not non-negative ints")
    return [int(s) for s in steps]
