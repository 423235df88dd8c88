"""Opening the Recorder's store: create it, start it over (``overwrite=True``), or resume it
after checking that the model is the one it records and is where the store left off, cutting
it back first when asked (``rewind=True``).

Nothing here changes an existing store before every check has passed: a refused resume leaves
it exactly as it was (the writer lock is taken first and given back on refusal).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spectra.capture.selection import RecordedMatrix
from spectra.store import (CreatedElsewhere, Location, RunWriter, StoreError, create_run, digest,
                           existing, resume_run)

_UNRELATED_COSINE = 0.1  # |cos(W, W_0)| below this: weights unrelated to the store's W_0


@dataclass
class Opened:
    """An open store and where recording starts in it."""

    writer: RunWriter
    global_step: int
    last_snapshot: int | None  # the last committed step (resumed stores), else None
    snapshot_now: bool  # take a snapshot at start
    created: bool = False  # this call created the store (a failed start() removes it)


def open_store(location: Location, matrices: Sequence[RecordedMatrix],
               weights: Mapping[str, torch.Tensor], *, start_step: int | None, rewind: bool,
               overwrite: bool, schedule: Any, meta: Mapping[str, Any], update_dtype: str,
               compressors: Any) -> Opened:
    """Create, replace or resume the store at ``location`` (see the module docstring);
    ``weights`` are the matrices now (host copies, name → (m, n)): W_0 of a new store, or
    checked against a resumed store's snapshots."""
    ours = {m.spec.name: weights[m.spec.name].numpy() for m in matrices}
    found = existing(location)
    if found == "other":
        raise StoreError(f"{location}: exists and is not a spectra run store; refusing to "
                         "write into it (choose another path)")
    if found == "store" and not overwrite:
        return _resume(location, matrices, ours, start_step, rewind, schedule)
    try:
        writer = create_run(location, [m.spec for m in matrices], ours, meta=meta,
                            update_dtype=update_dtype, compressors=compressors,
                            overwrite=overwrite)
    except CreatedElsewhere:  # another Recorder won the race: resume it (its lock names it)
        return _resume(location, matrices, ours, start_step, rewind, schedule)
    return Opened(writer, start_step or 0, None, True, created=True)


def _resume(location: Location, matrices: Sequence[RecordedMatrix], ours: dict[str, np.ndarray],
            start_step: int | None, rewind: bool, schedule: Any) -> Opened:
    writer = resume_run(location)
    try:
        opened = _continue(writer, matrices, ours, start_step, rewind, schedule)
        resumes = writer.meta.get("resumes", [])
        writer.update_meta(resumes=resumes + [{"at": _now(), "step": opened.global_step}])
        return opened
    except BaseException:
        writer.abandon()
        raise


def _continue(writer: RunWriter, matrices: Sequence[RecordedMatrix],
              ours: dict[str, np.ndarray], start_step: int | None, rewind: bool,
              schedule: Any) -> Opened:
    """Where recording continues in a resumed store; cuts it back when rewinding."""
    _check_same_matrices(writer, matrices)
    last = writer.last_step
    if last is None:
        return Opened(writer, start_step or 0, None, True)
    if start_step is None:
        _check_at_last_snapshot(writer, ours)
        return Opened(writer, last, last, False)
    if start_step > last:
        return Opened(writer, start_step, last, start_step in schedule)
    steps = writer.steps()
    keep = int(np.searchsorted(steps, start_step, side="right"))
    dropped = steps[keep:]
    if not rewind:
        raise StoreError(
            f"{writer.location}: start_step={start_step} is not after the last committed step "
            f"{last}: to cut the store back to its snapshots at steps ≤ {start_step} and "
            f"continue from there, pass rewind=True (drops {len(dropped)} snapshot(s): steps "
            f"{_span(dropped)})")
    if keep and steps[keep - 1] == start_step:
        differing = _differing(writer, ours, keep - 1)
        if differing:
            raise StoreError(f"{writer.location}: cannot rewind to step {start_step}: the model "
                             f"is not the store's snapshot at that step ({_names(differing)} "
                             "differ); restore the checkpoint of that step first")
    writer.cut_back(keep, "rewinds", {"at": _now(), "to_step": start_step, "from_step": last,
                                      "dropped": len(dropped), "dropped_steps": _span(dropped)})
    kept_last = int(steps[keep - 1]) if keep else None
    due = kept_last != start_step and start_step in schedule
    return Opened(writer, start_step, kept_last, due or keep == 0)


def _check_same_matrices(writer: RunWriter, matrices: Sequence[RecordedMatrix]) -> None:
    ours = {m.spec.name: m.spec.shape for m in matrices}
    theirs = {name: writer.spec(name).shape for name in writer.params}
    for name in ours.keys() | theirs.keys():
        if name not in theirs:
            raise StoreError(f"{writer.location}: cannot resume: the model has matrix {name!r} "
                             f"{ours[name]} that the store does not record")
        if name not in ours:
            raise StoreError(f"{writer.location}: cannot resume: the store records {name!r} "
                             f"{theirs[name]} but the model (after include/exclude) has no "
                             "such matrix")
        if ours[name] != theirs[name]:
            raise StoreError(f"{writer.location}: cannot resume: {name!r} has shape "
                             f"{ours[name]} in the model but {theirs[name]} in the store")


def _check_at_last_snapshot(writer: RunWriter, ours: dict[str, np.ndarray]) -> None:
    """A resume without start_step must find every matrix at the store's last snapshot."""
    last = writer.length - 1
    differing = _differing(writer, ours, last)
    if differing:
        raise StoreError(f"{writer.location}: cannot resume: {_diagnosis(writer, ours, differing)}")


def _diagnosis(writer: RunWriter, ours: dict[str, np.ndarray], differing: list[str]) -> str:
    """Why the model is not at the last snapshot, and what to pass."""
    steps, last = writer.steps(), writer.last_step
    matches = _matching_rows(writer, ours)
    diverged = [name for name in differing
                if not np.isfinite(writer.last_weights(name)).all()]
    if diverged:
        found = (f"; the model equals the snapshot at step {steps[matches[-1]]}, so pass "
                 f"start_step={steps[matches[-1]]}, rewind=True" if matches else
                 "; pass start_step=<the step of your checkpoint>, rewind=True to cut the store "
                 "back to it")
        return (f"the store's last snapshot (step {last}) has non-finite weights in "
                f"{_names(diverged)}: the run diverged there, and no model can continue from it"
                f"{found}, or overwrite=True to start over")
    new_run = "pass overwrite=True to start the store over, or choose another path"
    if matches and matches[-1] == 0:
        return (f"this looks like a new run: the model is the store's first snapshot (step "
                f"{steps[0]}), not its last (step {last}); {new_run}")
    if matches:
        row = matches[-1]
        return (f"your checkpoint is older than the store: the model is the snapshot at step "
                f"{steps[row]}, but the store goes on to step {last}; pass "
                f"start_step={steps[row]}, rewind=True to cut it back to that step (drops "
                f"{len(steps) - row - 1} snapshot(s)) and continue")
    cosine = _cosine_to_init(writer, ours)
    if abs(cosine) < _UNRELATED_COSINE:
        return (f"this looks like a new run: the model's weights are unrelated to the store's "
                f"(cosine {cosine:.2f} with its W_0) and differ from its last snapshot (step "
                f"{last}) in {_names(differing)}; {new_run}")
    return (f"the model differs from the store's last snapshot (step {last}) in "
            f"{_names(differing)} and matches none of its {len(steps)} snapshots: if your "
            "checkpoint is older, pass start_step=<its step>, rewind=True to cut the store back "
            f"to it; if this is a new run, {new_run}")


def _differing(writer: RunWriter, ours: dict[str, np.ndarray], row: int) -> list[str]:
    """Names of the matrices whose weights differ from the store's snapshot ``row``: by digest
    (bitwise) where the store keeps digests, else by value (stores of schema 1)."""
    digests = writer.digests()
    if digests is not None:
        return [name for name, code in zip(writer.params, digests[row])
                if digest(ours[name]) != code]
    differing = []
    for name in writer.params:
        stored = writer.weights(name, row)
        scale = 1e-7 * np.abs(stored).max() if stored.size else 0.0
        if not np.allclose(ours[name].astype(np.float64), stored, rtol=1e-6, atol=scale):
            differing.append(name)
    return differing


def _matching_rows(writer: RunWriter, ours: dict[str, np.ndarray]) -> list[int]:
    """Snapshot rows whose every matrix equals the model's (stores with digests only)."""
    digests = writer.digests()
    if digests is None:
        return []
    mine = np.array([digest(ours[name]) for name in writer.params], dtype=np.uint32)
    return [int(row) for row in np.flatnonzero((digests == mine).all(axis=1))]


def _cosine_to_init(writer: RunWriter, ours: dict[str, np.ndarray]) -> float:
    now = np.concatenate([ours[name].ravel() for name in writer.params]).astype(np.float64)
    init = np.concatenate([writer.init(name).ravel() for name in writer.params]).astype(np.float64)
    norm = np.linalg.norm(now) * np.linalg.norm(init)
    return float(now @ init / norm) if norm > 0 and np.isfinite(norm) else 1.0


def _names(names: list[str]) -> str:
    return str(names[:5])[:-1] + (f", … {len(names) - 5} more]" if len(names) > 5 else "]")


def _span(steps: np.ndarray) -> str:
    if len(steps) == 0:
        return "none"
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}..{steps[-1]}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
