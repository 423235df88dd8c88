"""The `spectra` command line."""

from __future__ import annotations

import argparse
import functools
import sys

from spectra.cli import analyze, demo, import_checkpoints, info, theory, train
from spectra.cli.options import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, KeyError) as exc:  # bad input: say it, no traceback
        print(f"spectra {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectra", description=__doc__,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=HelpFormatter))
    for module in (demo, train, analyze, theory, info, import_checkpoints):
        module.register(commands)
    return parser
