"""`spectra train`: a demo task trained with a method, recorded."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train the demo GPT or MLP with a method, recorded")
    train.add_argument("--method", default="full", help="full, inrank, inrank-efficient, "
                       "fixed-rank, oialr or oialr-stability")
    train.add_argument("--task", choices=["gpt", "mlp"], default="gpt")
    train.add_argument("--steps", type=int, default=1500, help="optimizer steps (gpt)")
    train.add_argument("--epochs", type=int, default=30, help="epochs (mlp)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=Path("runs"), help="folder for the store")
    train.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, e.g. -O alpha=0.9 (repeatable)")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from spectra.tasks.runs import gpt_run, mlp_run
    from spectra.tasks.loops import ClassifierTraining, GPTTraining
    options = dict(_option(text) for text in args.option)
    path = args.out / f"{args.task}-{args.method}-s{args.seed}.zarr"
    if path.exists():
        raise ValueError(f"{path} exists; remove it or choose another --out/--seed")
    if args.task == "gpt":
        result = gpt_run(args.method, path, options=options, quiet=args.quiet,
                         training=GPTTraining(steps=args.steps, seed=args.seed))
        score = f"validation {result.final['val_bpc']:.3f} bits/char"
    else:
        result = mlp_run(args.method, path, options=options, quiet=args.quiet,
                         training=ClassifierTraining(epochs=args.epochs, seed=args.seed))
        score = f"test accuracy {result.final['test_accuracy']:.4f}"
    extra = ", ".join(f"{k} {v:.4g}" for k, v in result.scalars.items())
    print(f"{args.method}: {score} in {result.seconds:.0f} s; {extra}\nrecorded: {path}")


def _option(text: str) -> tuple[str, object]:
    """'key=value' → (key, value parsed as int, float, bool or str)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"option {text!r}: expected KEY=VALUE")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)
