"""`spectra import`: a run store from checkpoints you already have."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import", help="a run store from a series of checkpoints (one snapshot each)",
        description="Write the weight matrices of a series of checkpoints into a run store, one "
                    "snapshot per checkpoint in step order, the first as W_0. CHECKPOINT: a torch "
                    "file (.pt/.pth/.bin/.ckpt), a .safetensors file, a HuggingFace folder, or a "
                    "folder of them (a Trainer's output directory). An existing STORE is "
                    "appended to.")
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="STORE",
                        help="the run store (created, or appended to)")
    parser.add_argument("--init", type=Path, metavar="CHECKPOINT",
                        help="the checkpoint of W_0, e.g. saved before training (default: the "
                             "one with the smallest step)")
    parser.add_argument("--steps", type=_steps, metavar="S1,S2,...",
                        help="one step per checkpoint, in the order given (default: from the "
                             "names or the checkpoints' metadata)")
    parser.add_argument("--include", nargs="+", metavar="PATTERN",
                        help="only matrices whose names match (shell patterns)")
    parser.add_argument("--exclude", nargs="+", metavar="PATTERN", help="drop matching matrices")
    parser.add_argument("--embeddings", action="store_true", help="import embedding tables too")
    parser.add_argument("--include-frozen", action="store_true",
                        help="import matrices that did not change between the first and the "
                             "last checkpoint too")
    parser.add_argument("--model-config", type=Path, metavar="CONFIG",
                        help="HuggingFace config.json (or its folder) of the checkpoints' model, "
                             "for orientation (default: the first checkpoint's config.json)")
    parser.add_argument("--update-dtype", choices=["float64", "float32"], default="float64",
                        help="dtype of the stored updates (float64: W_t exact)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> None:
    from spectra.capture.checkpoints import import_checkpoints
    from spectra.capture.checkpoints.sources import expand
    from spectra.store import is_run_store, open_run

    before = len(open_run(args.output)) if is_run_store(args.output) else 0
    given = len(expand(args.checkpoints)) + (args.init is not None)
    run = import_checkpoints(args.checkpoints, args.output, steps=args.steps, init=args.init,
                             include=args.include, exclude=args.exclude,
                             embeddings=args.embeddings, trainable_only=not args.include_frozen,
                             model_config=args.model_config, update_dtype=args.update_dtype,
                             quiet=args.quiet)
    new = [int(s) for s in run.steps[before:]]
    notes = run.attrs.get("import", {})
    if not new:
        print(f"nothing to import: the {given} checkpoint(s) are in {run.path} already")
        return
    verb = "appended" if before else "imported"
    print(f"{verb} {len(new)} checkpoint(s) {'to' if before else 'into'} {run.path}: "
          f"steps {_listed(new)}"
          + (f" ({given - len(new)} already there)" if given > len(new) else ""))
    if before:
        print(f"  the store now holds {len(run)} snapshots, steps {_listed(run.steps.tolist())}")
    else:
        print(f"  W_0: {notes['checkpoints'][0]['path']} (step {new[0]})")
    transposed = [n for n in run.params if "transposed" in run.spec(n).attrs.get("layout", "")]
    print(f"  {len(run.params)} matrices, (out, in)"
          + (f"; {len(transposed)} transformers Conv1D weights transposed" if transposed else ""))
    print(f"  orientation: {notes.get('orientation', 'recorded live')}")
    if notes.get("frozen"):
        print(f"  not imported, equal in the first and last checkpoint (frozen): "
              f"{_listed(notes['frozen'])} (--include-frozen imports them)")


def _steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. "
                                         "0,500,1000") from None
    return steps


def _listed(items: Sequence) -> str:
    shown = [str(i) for i in items]
    return ", ".join(shown) if len(shown) <= 8 else f"{', '.join(shown[:3])}, …, {shown[-1]} ({len(shown)})"
