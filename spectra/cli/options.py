"""What several commands share: the help layout (defaults shown) and the --threads option."""

from __future__ import annotations

import argparse

from spectra.core.threads import TRAINING_THREADS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (not for unset, empty or flag options) and keeps the line
    breaks of descriptions and epilogs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads: torch's CPU threads while training."""
    parser.add_argument("--threads", type=_threads, default=TRAINING_THREADS, metavar="N",
                        help="torch CPU threads while training; more than 1 pays only for "
                        "large models on idle cores (README: performance on shared machines)")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value
