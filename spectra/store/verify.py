"""Checking a whole store (:func:`verify_run`) and cutting a damaged one back to its last
intact snapshot (:func:`repair_run`, only when asked).

verify reads every chunk a committed snapshot needs (W_0, every ``updates`` row, ``steps``,
``time``, ``digests``, every scalar), so each checksum is checked and each missing chunk found;
it also checks that the committed steps strictly increase. It changes nothing and takes no lock,
so it can run beside a writer (it checks the snapshots committed when it started).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zarr

from spectra.store import chunks
from spectra.store.format import (SERIES_CHUNK, StoreDamaged, StoreError, open_root,
                                  series_arrays)
from spectra.store.location import Location, PathOrURL
from spectra.store.lock import StoreLock
from spectra.store.reader import committed_steps, written_by_schema_2
from spectra.store.writer import RunWriter

_BLOCK = 64  # update rows read at once; a failing block is re-read row by row


@dataclass(frozen=True)
class Problem:
    """One damaged or missing chunk, or an inconsistency. ``snapshot``: the first snapshot it
    affects (None: W_0, which every snapshot needs)."""

    array: str
    snapshot: int | None
    step: int | None
    reason: str
    message: str


@dataclass
class Report:
    """What :func:`verify_run` found. ``intact`` is the number of leading snapshots that are
    intact (what :func:`repair_run` keeps)."""

    location: Location
    snapshots: int
    chunks: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> bool:
        """False when W_0 itself is damaged: cutting snapshots cannot help."""
        return all(p.snapshot is not None for p in self.problems)

    @property
    def intact(self) -> int:
        return min([p.snapshot for p in self.problems if p.snapshot is not None],
                   default=self.snapshots)

    def lines(self) -> list[str]:
        """The report as text, one line per problem, the verdict last."""
        out = [p.message for p in self.problems]
        if self.ok:
            out.append(f"{self.location}: intact: {self.snapshots} committed snapshots, "
                       f"{self.chunks} chunks checked")
        elif not self.repairable:
            out.append(f"{self.location}: {len(self.problems)} problem(s); W_0 is damaged, so "
                       "no snapshot can be reconstructed: the store cannot be repaired")
        else:
            out.append(f"{self.location}: {len(self.problems)} problem(s); the first "
                       f"{self.intact} of {self.snapshots} snapshots are intact; "
                       f"`spectra repair {self.location} --cut` keeps those and drops the rest")
        return out


def verify_run(location: PathOrURL | Location) -> Report:
    """Check every chunk of the committed snapshots of the store at ``location``."""
    location = Location.of(location)
    root = open_root(location, mode="r")
    if "steps" not in root:
        raise StoreError(f"{location}: store creation was interrupted before it completed; it "
                         "holds no recorded data and can be deleted")
    problems: list[Problem] = []
    steps = _steps(root, problems)
    report = Report(location, len(steps), 0, problems)
    step_of = (lambda row: int(steps[row]) if 0 <= row < len(steps) else None)
    for name, array in series_arrays(root).items():
        if name != "steps":
            report.chunks += _check_series(array, len(steps), step_of, problems)
    for name in root.attrs["spectra"]["params"]:
        report.chunks += _check_matrix(root, name, len(steps), step_of, problems)
    problems.sort(key=lambda p: (-1 if p.snapshot is None else p.snapshot, p.array))
    return report


def repair_run(location: PathOrURL | Location, *, cut: bool = False) -> Report:
    """Verify the store; with ``cut``, keep only its intact leading snapshots (under the writer
    lock, recorded in attrs["spectra"]["repairs"]). Without ``cut`` nothing changes. Returns
    the report of the store as found."""
    location = Location.of(location)
    report = verify_run(location)
    if report.ok or not cut:
        return report
    if not report.repairable:
        raise StoreError(report.lines()[-1])
    lock = StoreLock(location).acquire()
    writer = RunWriter(location, lock, length=report.intact)
    try:
        writer.cut_back(report.intact, "repairs", {
            "at": _now(), "from_snapshots": report.snapshots, "to_snapshots": report.intact,
            "problems": [p.message for p in report.problems][:20]})
    finally:
        writer.close()
    return report


def _steps(root: zarr.Group, problems: list[Problem]) -> np.ndarray:
    """The committed steps; a damaged ``steps`` array yields its readable prefix."""
    try:
        steps = committed_steps(root)
    except StoreDamaged as exc:
        problems.append(_problem(exc))
        return _readable_prefix(root["steps"], exc.snapshot)
    decreasing = np.flatnonzero(np.diff(steps) <= 0)
    if decreasing.size:
        row = int(decreasing[0]) + 1
        problems.append(Problem("steps", row, int(steps[row]), "damaged",
                                f"{chunks.store_name(root['steps'])}: steps, snapshot {row}: step "
                                f"{steps[row]} does not follow {steps[row - 1]}"))
    return steps


def _readable_prefix(array: zarr.Array, bad_row: int | None) -> np.ndarray:
    stop = (bad_row or 0) // SERIES_CHUNK * SERIES_CHUNK
    return chunks.read(array, slice(0, stop)).astype(np.int64) if stop else np.zeros(0, np.int64)


def _check_series(array: zarr.Array, length: int, step_of: chunks.StepOf,
                  problems: list[Problem]) -> int:
    count = 0
    for first in range(0, length, SERIES_CHUNK):
        count += 1
        try:
            if not chunks.chunk_exists(array, (first // SERIES_CHUNK,) + (0,) * (array.ndim - 1)):
                raise chunks.missing(array, first, step_of)
            chunks.read(array, slice(first, min(length, first + SERIES_CHUNK)), rows=[first],
                        step_of=step_of)
        except StoreDamaged as exc:
            problems.append(_problem(exc))
    return count


def _check_matrix(root: zarr.Group, name: str, length: int, step_of: chunks.StepOf,
                  problems: list[Problem]) -> int:
    init = root[f"params/{name}/init"]
    try:
        if written_by_schema_2(root.attrs["spectra"]):
            chunks.require_whole(init)
        chunks.read(init, ...)
    except StoreDamaged as exc:
        problems.append(_problem(exc))
    updates = root[f"params/{name}/updates"]
    for rows in _blocks(length):
        try:
            values = chunks.read(updates, slice(rows[0], rows[-1] + 1), rows=rows,
                                 step_of=step_of)
            chunks.check_fill_rows(updates, values, rows, step_of)
        except StoreDamaged:
            problems.extend(_row_by_row(updates, rows, step_of))
    return 1 + length


def _row_by_row(array: zarr.Array, rows: list[int], step_of: chunks.StepOf) -> Iterator[Problem]:
    for row in rows:
        try:
            values = chunks.read(array, slice(row, row + 1), rows=[row], step_of=step_of)
            chunks.check_fill_rows(array, values, [row], step_of)
        except StoreDamaged as exc:
            yield _problem(exc)


def _blocks(length: int) -> Iterator[list[int]]:
    for first in range(0, length, _BLOCK):
        yield list(range(first, min(length, first + _BLOCK)))


def _problem(exc: StoreDamaged) -> Problem:
    return Problem(exc.array, exc.snapshot, exc.step, exc.reason, str(exc))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
