"""Opening the Recorder's store: create a new one, or resume an existing one after checking
that the model is the one it records and is where the store left off."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.capture.selection import RecordedMatrix
from spectra.store import RunWriter, StoreError, create_run, is_run_store, resume_run


@dataclass
class Opened:
    """An open store and where recording starts in it."""

    writer: RunWriter
    global_step: int
    last_snapshot: int | None  # the last committed step (resumed stores), else None
    snapshot_now: bool  # take a snapshot at start


def open_store(path: Path, matrices: Sequence[RecordedMatrix],
               weights: Mapping[str, torch.Tensor], *, start_step: int | None, schedule: Any,
               meta: Mapping[str, Any], update_dtype: str, compressors: Any) -> Opened:
    """Create or resume the store at ``path``; ``weights`` are the matrices now (host copies,
    name → (m, n)): W_0 of a new store, or checked against a resumed store's last snapshot."""
    if is_run_store(path):
        return _resume(path, matrices, weights, start_step, schedule)
    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise StoreError(f"{path}: exists and is not a spectra run store; refusing to "
                         "write into it (choose another path)")
    init = {m.spec.name: weights[m.spec.name].numpy() for m in matrices}
    writer = create_run(path, [m.spec for m in matrices], init, meta=meta,
                        update_dtype=update_dtype, compressors=compressors)
    return Opened(writer, start_step or 0, None, True)


def _resume(path: Path, matrices: Sequence[RecordedMatrix], weights: Mapping[str, torch.Tensor],
            start_step: int | None, schedule: Any) -> Opened:
    writer = resume_run(path)
    _check_same_matrices(path, matrices, writer)
    last = writer.last_step
    if start_step is None:
        global_step = 0 if last is None else last
        if last is not None:
            _check_weights_match(path, matrices, weights, writer, last)
    elif last is not None and start_step <= last:
        raise StoreError(f"{path}: start_step={start_step} is not after the last "
                         f"committed step {last}; steps must strictly increase")
    else:
        global_step = start_step
    resumes = writer.meta.get("resumes", [])
    writer.update_meta(resumes=resumes + [{"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "step": global_step}])
    due = last is None or (global_step > last and global_step in schedule)
    return Opened(writer, global_step, last, due)


def _check_same_matrices(path: Path, matrices: Sequence[RecordedMatrix], writer: RunWriter) -> None:
    ours = {m.spec.name: m.spec.shape for m in matrices}
    theirs = {name: writer.spec(name).shape for name in writer.params}
    for name in ours.keys() | theirs.keys():
        if name not in theirs:
            raise StoreError(f"{path}: cannot resume: the model has matrix {name!r} "
                             f"{ours[name]} that the store does not record")
        if name not in ours:
            raise StoreError(f"{path}: cannot resume: the store records {name!r} "
                             f"{theirs[name]} but the model (after include/exclude) has no "
                             "such matrix")
        if ours[name] != theirs[name]:
            raise StoreError(f"{path}: cannot resume: {name!r} has shape {ours[name]} "
                             f"in the model but {theirs[name]} in the store")


def _check_weights_match(path: Path, matrices: Sequence[RecordedMatrix],
                         weights: Mapping[str, torch.Tensor], writer: RunWriter, last: int) -> None:
    """A resume without start_step must find the model at the store's last snapshot."""
    first = matrices[0]
    stored = writer.last_weights(first.spec.name)
    now = weights[first.spec.name].numpy().astype(np.float64)
    if not np.allclose(now, stored, rtol=1e-6, atol=1e-7 * np.abs(stored).max()):
        raise StoreError(
            f"{path}: cannot resume: {first.spec.name!r} differs from the store's last "
            f"snapshot (step {last}); pass start_step=<the step your checkpoint was saved at>")
