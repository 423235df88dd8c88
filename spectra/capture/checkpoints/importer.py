"""import_checkpoints: a run store from a series of checkpoints, one snapshot per checkpoint in
step order, through the same matrix rules as the Recorder (spectra.capture.rules).

    run = spectra.import_checkpoints("out/", "runs/imported.zarr")   # out/checkpoint-<step>/...

How it proceeds, so that memory stays at one checkpoint's matrices whatever the number of
checkpoints, and a failure never costs committed data:
1. every checkpoint is opened once for its step (name, metadata or ``steps=``), then closed;
2. the model class (orientation, ties) comes from ``model=``, ``model_config=`` or W_0's
   config.json; W_0's tensors are described to the rules; with ``trainable_only`` a matrix equal
   in W_0 and the last checkpoint is frozen and left out;
3. every checkpoint's matrices are checked against W_0's (names, shapes, orientation) from its
   headers alone, before anything is written;
4. the store is created with W_0 (or an existing one resumed), then each checkpoint is opened,
   its matrices are read one at a time as the store's writer asks for them (RunWriter.append,
   the commit protocol of spectra.store) and it is closed before the next is opened.
A process killed at any moment leaves the committed snapshots intact; running the same import
again continues it (checkpoints already in the store are checked and skipped).

Each snapshot's scalars are what the checkpoint's trainer logged at its step; its time is the
checkpoint's file modification time minus W_0's (seconds).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from spectra.capture import rules
from spectra.capture.checkpoints import architecture as arch
from spectra.capture.checkpoints import steps as stepping
from spectra.capture.checkpoints.sources import Checkpoint, expand, open_checkpoint
from spectra.capture.host import host_copy
from spectra.store import (Location, MatrixSpec, Run, RunWriter, StoreError, create_run,
                           is_run_store, open_run, resume_run)

PathLike = str | os.PathLike


def import_checkpoints(paths: PathLike | Sequence[PathLike], store: PathLike, *,
                       steps: Sequence[int] | None = None, init: PathLike | None = None,
                       include: str | Sequence[str] | None = None,
                       exclude: str | Sequence[str] | None = None, embeddings: bool = False,
                       trainable_only: bool = True, model_config: Any = None,
                       model: nn.Module | None = None, update_dtype: str = "float64",
                       compressors: Any = "auto", quiet: bool = False) -> Run:
    """Write the weight matrices of a series of checkpoints into the run store ``store``.

    Args:
        paths: checkpoints (torch files, .safetensors files, HuggingFace folders), or folders
            of them (a Trainer's output directory: its ``checkpoint-<step>`` folders); formats
            in spectra.capture.checkpoints.sources.
        store: the run store. A new one gets one snapshot per checkpoint, W_0 the first; an
            existing one is appended to: steps after its last, the same matrices, W_0 kept;
            checkpoints already in it (same step) are checked and skipped.
        steps: one step per checkpoint of ``paths`` (folders expanded), in that order. Default:
            what each checkpoint's name or metadata states (spectra.capture.checkpoints.steps).
        init: the checkpoint of W_0 (e.g. the weights saved before training), for a new store;
            its step is what it states, else 0. Default: the checkpoint with the smallest step.
        include, exclude, embeddings, trainable_only: which matrices, as for the Recorder
            (spectra.capture.rules). A checkpoint does not say which parameters train; with
            ``trainable_only`` a matrix bitwise equal in W_0 and the last checkpoint is frozen
            and not imported (as are frozen parameters of a given ``model``). Appending uses
            the store's own selection; options given must agree with it.
        model_config: a HuggingFace config (a config.json, a folder holding one, or a
            PretrainedConfig) of the checkpoints' model, for orientation and ties. Default:
            W_0's own config.json, if it has one.
        model: instead of a config, an nn.Module of the checkpoints' architecture (any device,
            meta included; its weights are not read).
        update_dtype, compressors: as the Recorder's (new stores only).
        quiet: no progress bar.

    Returns the store, opened for reading. Raises FileNotFoundError or ValueError (StoreError)
    naming the checkpoint, matrix or option at fault.
    """
    if model is not None and model_config is not None:
        raise ValueError("pass model= or model_config=, not both")
    selection = _Selection.of(include, exclude, embeddings, trainable_only)
    found = expand([paths] if isinstance(paths, str | os.PathLike) else paths)
    series = stepping.resolve(found, [_stated(p) for p in found], steps)
    store = Location.of(store)
    if is_run_store(store):
        if init is not None:
            raise ValueError(f"{store}: an existing store keeps its W_0; init= is for a new store")
        return _append(store, series, selection, model, model_config, quiet)
    if init is not None:
        series = [_initial(Path(init), series)] + series
    return _create(store, stepping.in_order(series), selection, model, model_config,
                   update_dtype, compressors, quiet)


@dataclass(frozen=True)
class _Selection:
    """Which matrices: the rules' options, as kept in the store's attrs."""

    include: list[str] | None
    exclude: list[str] | None
    embeddings: bool
    trainable_only: bool

    @classmethod
    def of(cls, include: Any, exclude: Any, embeddings: bool, trainable_only: bool) -> _Selection:
        return cls(rules.patterns(include, "include") or None,
                   rules.patterns(exclude, "exclude") or None, bool(embeddings),
                   bool(trainable_only))

    def choose(self, described: Sequence[arch.Described], source: Path) -> list[MatrixSpec]:
        return rules.choose([d.candidate for d in described], include=self.include,
                            exclude=self.exclude, embeddings=self.embeddings,
                            trainable_only=self.trainable_only, source=str(source))

    def agreed(self, stored: Mapping[str, Any] | None, store: Location) -> _Selection:
        """The store's selection, if the options given (those not at their default) agree."""
        if stored is None:
            return self
        theirs = _Selection(**stored)
        default = _Selection(None, None, False, True)
        differ = [f"{k}={v!r}" for k, v in asdict(self).items()
                  if v != asdict(default)[k] and v != asdict(theirs)[k]]
        if differ:
            raise ValueError(f"{store}: was imported with {asdict(theirs)}; appending uses the "
                             f"same matrices: leave out {differ} or pass the store's values")
        return theirs


@dataclass
class _Plan:
    """What is imported: the architecture, the stored matrices and the frozen names."""

    architecture: arch.Architecture | None
    specs: list[MatrixSpec]
    frozen: list[str]
    selection: _Selection
    against: str = "W_0's"  # what the specs are, in messages

    def read(self, checkpoint: Checkpoint) -> dict[str, arch.Described]:
        """The stored matrices' descriptions in ``checkpoint``; ValueError if they differ."""
        described = arch.describe(checkpoint, self.architecture, self.frozen)
        specs = self.selection.choose(described, checkpoint.path)
        _check_same(self.specs, specs, checkpoint.path, self.architecture, self.against)
        return {d.candidate.name: d for d in described}


def _create(store: Location, series: list[stepping.Stepped], selection: _Selection,
            model: nn.Module | None, model_config: Any, update_dtype: str, compressors: Any,
            quiet: bool) -> Run:
    first = series[0]
    with open_checkpoint(first.path) as w0:
        plan = _plan(w0, series[-1], selection, _architecture(model, model_config, w0), len(series))
    _check_all(plan, series[1:])
    with open_checkpoint(first.path) as w0, _bar(plan, len(series), quiet) as bar:
        meta = {"model": plan.architecture.model if plan.architecture else "unknown",
                "schedule": {"kind": "checkpoints"}, "config": {},
                "torch_version": torch.__version__,
                "import": {"orientation": arch.orientation(plan.architecture),
                           "selection": asdict(plan.selection), "frozen": plan.frozen,
                           "time_origin_unix": w0.mtime, "checkpoints": [_record(first, w0)]}}
        writer = create_run(store, plan.specs, _Matrices(w0, plan.read(w0), plan.specs, bar),
                            meta=meta, update_dtype=update_dtype, compressors=compressors)
        try:
            writer.append(first.step, {name: writer.init(name) for name in writer.params},
                          w0.scalars, time=0.0)
            _write(writer, plan, series[1:], bar, w0.mtime)
        finally:
            writer.close()
    return open_run(store)


def _append(store: Location, series: list[stepping.Stepped], selection: _Selection,
            model: nn.Module | None, model_config: Any, quiet: bool) -> Run:
    series = stepping.in_order(series)
    run = open_run(store)
    done = {int(s): row for row, s in enumerate(run.steps)}
    last = int(run.steps[-1]) if len(run) else None
    early = [c for c in series if c.step not in done and last is not None and c.step <= last]
    if early:
        raise StoreError(f"{early[0].path}: step {early[0].step} ({early[0].source}) is not after "
                         f"the last step {last} of {store} and not one of its steps; steps must "
                         "strictly increase")
    todo = [c for c in series if c.step not in done]
    meta = run.attrs.get("import", {})
    with open_checkpoint(series[0].path) as probe:
        plan = _Plan(_architecture(model, model_config, probe),
                     [run.spec(name) for name in run.params], list(meta.get("frozen", [])),
                     selection.agreed(meta.get("selection"), store), f"those of {store}")
    for c in series:
        if c.step in done:
            _check_imported(run, done[c.step], c, plan)
    if not todo:
        return run
    _check_all(plan, todo)
    writer = resume_run(store)
    try:
        origin = float(meta.get("time_origin_unix", writer.created))
        with _bar(plan, len(todo), quiet) as bar:
            _write(writer, plan, todo, bar, origin)
    finally:
        writer.close()
    return open_run(store)


def _plan(w0: Checkpoint, last: stepping.Stepped, selection: _Selection,
          architecture: arch.Architecture | None, count: int) -> _Plan:
    """The matrices of W_0 to import; with trainable_only, those equal in W_0 and ``last`` are
    frozen (a checkpoint cannot say which parameters train, the series can)."""
    described = arch.describe(w0, architecture)
    specs = selection.choose(described, w0.path)
    frozen: list[str] = []
    if selection.trainable_only and count > 1:
        with open_checkpoint(last.path) as final:
            frozen = _unchanged(w0, final, {d.candidate.name: d for d in described}, specs,
                                architecture)
        if len(frozen) == len(specs):
            raise ValueError(f"every matrix chosen is equal in {w0.path} and {last.path}: none "
                             "trained between them; pass trainable_only=False "
                             "(--include-frozen) to import them anyway")
        if frozen:
            specs = selection.choose(arch.describe(w0, architecture, frozen), w0.path)
    return _Plan(architecture, specs, frozen, selection)


def _unchanged(w0: Checkpoint, final: Checkpoint, described: dict[str, arch.Described],
               specs: Sequence[MatrixSpec], architecture: arch.Architecture | None) -> list[str]:
    theirs = {d.candidate.name: d for d in arch.describe(final, architecture)}
    same = []
    for spec in specs:
        mine, other = described[spec.name], theirs.get(spec.name)
        if (other is not None and other.candidate.shape == mine.candidate.shape
                and torch.equal(mine.matrix(w0), other.matrix(final))):
            same.append(spec.name)
    return same


def _check_all(plan: _Plan, series: Sequence[stepping.Stepped]) -> None:
    """Every checkpoint holds the plan's matrices (from its headers: no weights are read)."""
    for c in series:
        with open_checkpoint(c.path) as checkpoint:
            plan.read(checkpoint)


def _check_imported(run: Run, row: int, c: stepping.Stepped, plan: _Plan) -> None:
    """A checkpoint at a step the store holds must be the one imported there (first matrix)."""
    name = run.params[0]
    with open_checkpoint(c.path) as checkpoint:
        now = host_copy(plan.read(checkpoint)[name].matrix(checkpoint)).numpy()
    stored = run.weights(name, row)
    # float64 updates give W_t back bitwise; float32 ones to about ulp(max |W|) (spectra.store)
    exact = run.attrs.get("update_dtype", "float64") == "float64"
    tolerance = 0.0 if exact else 2 * float(np.spacing(np.abs(stored).max()))
    if np.abs(now.astype(np.float64) - stored).max() > tolerance:
        raise StoreError(f"{c.path}: step {c.step} is in {run.path} already, but its {name!r} "
                         "differs from the stored one: not the checkpoint imported there")


def _write(writer: RunWriter, plan: _Plan, series: Sequence[stepping.Stepped], bar: tqdm,
           origin: float) -> None:
    """Append one snapshot per checkpoint, each read one matrix at a time."""
    for c in series:
        bar.set_postfix_str(f"step {c.step}")
        try:
            with open_checkpoint(c.path) as checkpoint:
                matrices = _Matrices(checkpoint, plan.read(checkpoint), plan.specs, bar)
                writer.append(c.step, matrices, checkpoint.scalars,
                              time=checkpoint.mtime - origin)
                record = _record(c, checkpoint)
        except (ValueError, OSError) as exc:
            raise StoreError(f"{exc}; {writer.path} keeps its {writer.length} committed "
                             "snapshots: fix the checkpoint and run the same import again to "
                             "continue") from exc
        imported = writer.meta.get("import", {})
        writer.update_meta(**{"import": {**imported,
                                         "checkpoints": imported.get("checkpoints", []) + [record]}})


class _Matrices(Mapping):
    """One checkpoint's stored matrices for the store's writer: each value tells its shape
    without reading, and is read when the writer converts it (np.asarray), one at a time."""

    def __init__(self, checkpoint: Checkpoint, described: dict[str, arch.Described],
                 specs: Sequence[MatrixSpec], bar: tqdm):
        self._matrices = {spec.name: _Matrix(checkpoint, described[spec.name], spec.shape, bar)
                          for spec in specs}

    def __getitem__(self, name: str) -> _Matrix:
        return self._matrices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._matrices)

    def __len__(self) -> int:
        return len(self._matrices)


class _Matrix:
    """A stored matrix of a checkpoint, (m, n) float32 (float64 kept), read on conversion."""

    def __init__(self, checkpoint: Checkpoint, described: arch.Described,
                 shape: tuple[int, int], bar: tqdm):
        self._checkpoint, self._described, self._bar = checkpoint, described, bar
        self.shape = tuple(shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        matrix = host_copy(self._described.matrix(self._checkpoint)).numpy()
        self._bar.update(1)
        return matrix if dtype is None else matrix.astype(dtype, copy=False)


def _stated(path: Path) -> dict[str, int]:
    """The steps a checkpoint states: its name's and its metadata's."""
    with open_checkpoint(path) as checkpoint:
        return {**stepping.name_steps(checkpoint.path), **checkpoint.steps}


def _initial(path: Path, series: Sequence[stepping.Stepped]) -> stepping.Stepped:
    """The init checkpoint, at the step it states or 0; before every other checkpoint."""
    stated = _stated(path)
    init = (stepping.resolve([path], [stated], None)[0] if stated
            else stepping.Stepped(path, 0, "init= without a stated step"))
    later = [c for c in series if c.step <= init.step]
    if later:
        raise ValueError(f"init {path} is at step {init.step} ({init.source}) but {later[0].path} "
                         f"is at step {later[0].step}; W_0 must come first")
    return init


def _architecture(model: nn.Module | None, model_config: Any,
                  w0: Checkpoint) -> arch.Architecture | None:
    if model is not None:
        return arch.from_model(model)
    if model_config is not None:
        return arch.from_config(model_config, w0)
    return arch.from_config(w0.config, w0) if w0.config is not None else None


def _check_same(expected: Sequence[MatrixSpec], found: Sequence[MatrixSpec], source: Path,
                architecture: arch.Architecture | None, against: str) -> None:
    """``found`` (a checkpoint's matrices) must be ``expected`` (W_0's or the store's)."""
    ours, theirs = {s.name: s for s in found}, {s.name: s for s in expected}
    problems = []
    if missing := [n for n in theirs if n not in ours]:
        problems.append(f"lacks {_few(missing)}")
    if extra := [n for n in ours if n not in theirs]:
        problems.append(f"has {_few(extra)} besides")
    if reshaped := [f"{n} {ours[n].original_shape} (stored {theirs[n].original_shape})"
                    for n in theirs if n in ours
                    and ours[n].original_shape != theirs[n].original_shape]:
        problems.append(f"has other shapes: {_few(reshaped)}")
    if turned := [f"{n} as {_form(ours[n])} (stored {_form(theirs[n])})" for n in theirs
                  if n in ours and _form(ours[n]) != _form(theirs[n])
                  and ours[n].original_shape == theirs[n].original_shape]:
        problems.append(f"reads {_few(turned)} with orientation {arch.orientation(architecture)!r}")
    if problems:
        raise StoreError(f"{source}: its matrices differ from {against}: {'; '.join(problems)}")


def _few(names: Sequence[str], shown: int = 6) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{list(names[:shown])}{more}"


def _form(spec: MatrixSpec) -> str:
    layout = spec.attrs.get("layout")
    return f"{spec.kind}, {layout}" if layout else spec.kind


def _record(c: stepping.Stepped, checkpoint: Checkpoint) -> dict[str, Any]:
    return {"step": c.step, "path": str(c.path.resolve()), "format": checkpoint.format,
            "step_from": c.source}


def _bar(plan: _Plan, count: int, quiet: bool) -> tqdm:
    return tqdm(total=count * len(plan.specs), unit="matrix", desc="importing", disable=quiet,
                leave=False)
