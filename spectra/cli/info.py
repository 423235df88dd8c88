"""`spectra info`: describe a run store."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def register(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="describe a run store")
    info.add_argument("store", help="a run store (path or URL)")
    info.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> None:
    from spectra.store import open_run
    run = open_run(args.store)
    meta = run.attrs
    where = f"  ({_size(run.path)} on disk)" if run.location.is_local else ""
    print(f"{run.path}{where}")
    print(f"  model {meta.get('model', '?')}, created {meta['created']}, schema {meta['schema']}")
    if "optimizer" in meta:
        print(f"  optimizer {meta['optimizer'].get('name')}")
    if len(run):
        print(f"  {len(run)} snapshots, steps {run.steps[0]}..{run.steps[-1]}, "
              f"{run.time[-1]:.1f} s recorded")
    else:
        print("  no committed snapshots")
    scalars = run.scalars
    if scalars:
        print("  scalars: " + ", ".join(f"{k} (last {_last(v)})" for k, v in scalars.items()))
    width = max(len(name) for name in run.params)
    print(f"  {len(run.params)} matrices:")
    for name in run.params:
        spec = run.spec(name)
        original = "" if spec.original_shape == spec.shape else f"  from {spec.original_shape}"
        print(f"    {name:<{width}}  {spec.shape[0]:>5} x {spec.shape[1]:<5} {spec.kind}{original}")


def _last(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite[-1]:.4g}" if finite.size else "none"


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.1f} {unit}" if unit != "B" else f"{total} B"
        total /= 1024
    raise AssertionError("unreachable")
