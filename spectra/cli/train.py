"""`spectra train`: a demo task trained with a method, recorded."""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spectra.cli.options import add_threads

REGISTRY_ARGUMENTS = ("lr", "weight_decay", "total_steps")  # what build_method passes itself


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train the demo GPT or MLP with a method, recorded",
                                add_help=False)
    train.add_argument("-h", "--help", action=_HelpWithMethodOptions, nargs=0,
                       help="show this help, with each method's -O keys, and exit")
    train.add_argument("--method", default="full", help="how to train (the methods and their "
                       "options are listed below)")
    train.add_argument("--task", choices=["gpt", "mlp"], default="gpt",
                       help="gpt: the character GPT on the KJV text (bits/char); mlp: a "
                       "784-512-512-10 MLP on MNIST-5k (test accuracy)")
    train.add_argument("--steps", type=int, default=1500, help="optimizer steps (gpt)")
    train.add_argument("--epochs", type=int, default=30, help="epochs (mlp)")
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    train.add_argument("--out", type=Path, default=Path("runs"),
                       help="folder for the store <task>-<method>-s<seed>.zarr")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing store of the same name")
    train.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, e.g. -O alpha=0.9 (repeatable; keys below)")
    add_threads(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from spectra.tasks.loops import ClassifierTraining, GPTTraining
    from spectra.tasks.runs import gpt_run, method_factory, mlp_run
    options = dict(_option(text) for text in args.option)
    method_factory(args.method)  # an unknown method: say so before anything is trained
    path = args.out / f"{args.task}-{args.method}-s{args.seed}.zarr"
    if path.exists() and not args.overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it, or choose another "
                         "--out or --seed")
    try:
        if args.task == "gpt":
            result = gpt_run(args.method, path, options=options, quiet=args.quiet,
                             threads=args.threads, overwrite=args.overwrite,
                             training=GPTTraining(steps=args.steps, seed=args.seed))
            score = f"validation {result.final['val_bpc']:.3f} bits/char"
        else:
            result = mlp_run(args.method, path, options=options, quiet=args.quiet,
                             threads=args.threads, overwrite=args.overwrite,
                             training=ClassifierTraining(epochs=args.epochs, seed=args.seed))
            score = f"test accuracy {result.final['test_accuracy']:.4f}"
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"method {args.method!r}: {exc.args[0].split(' got ')[-1]}; its -O keys: "
                         f"{', '.join(method_options(args.method)) or 'none'}") from None
    extra = ", ".join(f"{k} {v:.4g}" for k, v in result.scalars.items())
    print(f"{args.method}: {score} in {result.seconds:.0f} s; {extra}\nrecorded: {path}")


def _option(text: str) -> tuple[str, object]:
    """'key=value' → (key, value parsed as int, float, bool, None or str)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"option {text!r}: expected KEY=VALUE")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def method_options(method: str) -> dict[str, Any]:
    """The -O keys of ``method`` with their defaults: its factory's keyword parameters beyond
    those build_method passes, then, where it takes ``**options``, the keyword parameters of
    the functions and classes its source hands keyword arguments on to (``f(..., **x)``),
    following the options into helpers of its own module (``_build(..., options)``); a method
    with presets shows its default preset's values (its module's ``preset_options``)."""
    from spectra.tasks.runs import method_factory
    factory = method_factory(method)
    found = {name: default for name, default in _keywords(factory).items()
             if name not in REGISTRY_ARGUMENTS}
    variadic = [p.name for p in inspect.signature(factory).parameters.values()
                if p.kind is inspect.Parameter.VAR_KEYWORD]
    if variadic:
        found.update({k: v for k, v in _forwarded(factory, variadic[0]).items() if k not in found})
    presets = getattr(inspect.getmodule(factory), "preset_options", None)
    if presets is not None and "preset" in found:  # the preset's values, not the layers' own
        found.update(presets(method, found["preset"]))
    return found


def _keywords(function: Callable, positional: int = 0, bound: set[str] = frozenset()) -> dict:
    """Parameters of ``function`` that take a keyword and have a default, less the first
    ``positional`` ones and those in ``bound`` (what a call already passes)."""
    parameters = list(inspect.signature(function).parameters.values())[positional:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in bound}


def _forwarded(function: Callable, name: str) -> dict:
    """Keywords reached by ``name`` (a dict of options) inside ``function``'s source."""
    found: dict = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        callee = _resolve(call.func, function.__globals__)
        if callee is None:
            continue
        if any(keyword.arg is None for keyword in call.keywords):  # callee(..., **something)
            found.update(_keywords(callee, len(call.args),
                                   {k.arg for k in call.keywords if k.arg}))
            continue
        handed = [i for i, arg in enumerate(call.args)
                  if isinstance(arg, ast.Name) and arg.id == name]
        if handed and inspect.isfunction(callee):  # a helper taking the options as a dict
            parameter = list(inspect.signature(callee).parameters)[handed[0]]
            found.update(_forwarded(callee, parameter))
    return found


def _resolve(node: ast.expr, names: dict) -> Callable | None:
    """The function or class a call's ``func`` names in the module's globals, if it is one."""
    if isinstance(node, ast.Name) and callable(names.get(node.id)):
        return names[node.id]
    return None


def _options_text() -> str:
    """The -O keys of every method with their defaults, for --help."""
    from spectra.methods.registry import METHODS
    lines = ["methods and their options (-O KEY=VALUE; with --task mlp, 'layers' defaults to "
             "the hidden layers):"]
    for method in METHODS:
        options = method_options(method)
        listing = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
        lines.append(textwrap.fill(f"{method}: {listing}", width=96, initial_indent="  ",
                                   subsequent_indent="      "))
    return "\n".join(lines)


class _HelpWithMethodOptions(argparse.Action):
    """-h: the help with the methods' options appended (built only when asked for: reading
    the methods imports torch)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = _options_text()
        parser.print_help()
        parser.exit()
