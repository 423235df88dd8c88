"""The `spectra` command line.

Errors. A mistake in the input or the environment (a missing, damaged or locked store, a bad
option, a full or read-only disk, a missing folder) prints one line that names what is wrong,
``spectra <command>: error: …``, and exits with status 2. Anything else is a bug in spectra:
one line, status 1, and the traceback with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import traceback
from collections.abc import Iterator

from spectra.cli import analyze, demo, import_checkpoints, info, theory, train, verify
from spectra.cli.options import HelpFormatter

# OSErrors are the environment's (disk, permissions, paths); these errno values get words
_ENVIRONMENT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOENT: "no such file or directory",
                errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory",
                errno.EEXIST: "already exists", errno.ENOTEMPTY: "directory not empty",
                errno.EMFILE: "too many open files", errno.ENAMETOOLONG: "file name too long",
                errno.EIO: "input/output error"}
# exception types that are the user's or the environment's (ValueError: a bad argument,
# including spectra's StoreError; KeyError: an unknown name; ImportError: an optional package;
# any OSError: the disk, permissions, paths)
_USER = (ValueError, KeyError, ImportError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"spectra {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        if is_user_error(exc):
            print(f"spectra {args.command}: error: {message(exc)}", file=sys.stderr)
            return 2
        print(f"spectra {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(a bug in spectra; rerun with --debug for the traceback, and please report it)",
              file=sys.stderr)
        return 1


def is_user_error(exc: BaseException) -> bool:
    """True if ``exc`` (or an error it was raised from) is the input's or the environment's
    fault rather than spectra's."""
    return any(isinstance(e, _USER) for e in _chain(exc))


def message(exc: BaseException) -> str:
    """One line for a user's or the environment's error."""
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT:
        return _os_message(exc)
    if isinstance(exc, KeyError) and exc.args:
        return _one_line(exc.args[0])
    if isinstance(exc, ImportError) and exc.name:
        return f"{_one_line(exc)} (install the missing package {exc.name!r})"
    return _one_line(exc)


def _os_message(exc: OSError) -> str:
    what = _ENVIRONMENT[exc.errno]
    if exc.filename is None:
        return what
    path = os.fspath(exc.filename)
    folder = os.path.dirname(path)
    if exc.errno == errno.ENOENT and folder and not os.path.isdir(folder):
        return f"{path}: folder {folder} does not exist (create it first)"
    hints = {errno.ENOSPC: " (free some space; a recording can then be resumed)",
             errno.EROFS: " (write somewhere else)", errno.EACCES: " (check its permissions)"}
    return f"{path}: {what}{hints.get(exc.errno, '')}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectra", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=HelpFormatter))
    for module in (demo, train, analyze, theory, info, import_checkpoints, verify):
        module.register(commands)
    for command in commands.choices.values():  # --debug after the command, too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser
