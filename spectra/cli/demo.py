"""`spectra demo`: train, record, analyze and plot the demo runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from spectra.cli.options import add_threads


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="train and record the demo GPT and MLP")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="folder for the stores")
    demo.add_argument("--figures", type=Path, default=Path("figures"), help="folder for the PNGs")
    demo.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    add_threads(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from spectra.tasks.demo import run_demo
    runs = run_demo(args.out, args.figures, quick=args.quick, quiet=args.quiet,
                    threads=args.threads)
    print(f"recorded: {runs.gpt}\n          {runs.mlp}")
    for path in runs.figures:
        print(f"figure:   {path}")
    print(f"inspect with: spectra info {runs.gpt}   or   spectra analyze {runs.gpt}")
