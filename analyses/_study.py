"""What every study script in analyses/ shares: its command-line options and thread setup.

    parser = study_parser(__doc__, out="runs/my_study", quick="tiny runs (about a minute)")
    parser.add_argument(...)                      # the study's own options
    args = parse(parser)                          # sets torch's thread count from --threads

and reading a recorded scalar's final value back: ``last_finite(run.scalars["rank.fc"])``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def study_parser(doc: str, *, out: str, quick: str) -> argparse.ArgumentParser:
    """A parser with --quick, --out (folder of the run stores), --figures, --fresh, --threads
    and --quiet; its description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=Path(out), help="folder of the run stores")
    parser.add_argument("--figures", type=Path, default=Path("figures"))
    parser.add_argument("--fresh", action="store_true", help="retrain runs found in --out")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: studies share the machine with other work)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line, set torch's thread count, create --figures."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.figures.mkdir(parents=True, exist_ok=True)
    return args


def last_finite(values: np.ndarray) -> float:
    """The last finite entry of a recorded scalar series (NaN before the scalar first appeared),
    or NaN if it has none."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else float("nan")
