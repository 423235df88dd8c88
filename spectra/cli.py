"""The `spectra` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, KeyError) as exc:  # bad input: say it, no traceback
        print(f"spectra {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectra", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and record the demo GPT and MLP")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="folder for the stores")
    demo.add_argument("--figures", type=Path, default=Path("figures"), help="folder for the PNGs")
    demo.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=_demo)

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

    analyze = commands.add_parser("analyze", help="spectral metrics of a store (cached in it)")
    analyze.add_argument("store", type=Path)
    analyze.add_argument("-o", "--output", type=Path, help="write the frame (.csv or .parquet)")
    _analysis_options(analyze)
    analyze.set_defaults(func=_analyze)

    plot = commands.add_parser("plot", help="figures of one or more stores")
    plot.add_argument("stores", type=Path, nargs="+")
    plot.add_argument("-o", "--out", type=Path, required=True, help="folder for the PNGs")
    plot.add_argument("--metric", default="effective_rank", help="metric compared across runs")
    _analysis_options(plot)
    plot.set_defaults(func=_plot)

    theory = commands.add_parser("theory", help="check incremental-rank learning on deep "
                                 "linear networks against closed forms (C1-C6)")
    theory.add_argument("--depth", type=int, default=3, help="weight matrices D (default 3)")
    theory.add_argument("--alpha", type=float, default=0.1, help="init scale α (default 0.1)")
    theory.add_argument("--optimizer", choices=["gd", "sgd", "adam"], default="gd")
    theory.add_argument("--width", type=int, default=32, help="hidden width (default 32)")
    theory.add_argument("--teacher", default="8,4,2,1",
                        help="the teacher's distinct singular values (default 8,4,2,1)")
    theory.add_argument("--seed", type=int, default=0)
    theory.add_argument("--alphas", help="init scales of the sweep (C2 slope, C4 vs α, C6; "
                        "default 0.05,0.1,0.2,0.3,0.5,0.7,1)")
    theory.add_argument("--out", type=Path, default=Path("runs/theory"),
                        help="folder for the stores, the table and the figures")
    theory.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: more only slow these tiny networks)")
    theory.add_argument("--quiet", action="store_true")
    theory.set_defaults(func=_theory)

    info = commands.add_parser("info", help="describe a run store")
    info.add_argument("store", type=Path)
    info.set_defaults(func=_info)
    return parser


def _demo(args: argparse.Namespace) -> None:
    from spectra.demo import run_demo
    runs = run_demo(args.out, args.figures, quick=args.quick, quiet=args.quiet)
    print(f"recorded: {runs.gpt}\n          {runs.mlp}")
    for path in runs.figures:
        print(f"figure:   {path}")
    print(f"inspect with: spectra info {runs.gpt}   or   spectra analyze {runs.gpt}")


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=8, help="top-k subspace size (0: values only)")
    parser.add_argument("--targets", nargs="+", default=["updates", "weights"],
                        choices=["updates", "weights"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _analyzed(store: Path, args: argparse.Namespace):
    from spectra.analyze import analyze
    return analyze(store, targets=args.targets, k=args.k, device=args.device, quiet=args.quiet)


def _analyze(args: argparse.Namespace) -> None:
    frame = _analyzed(args.store, args)
    if args.output:
        _write_frame(frame, args.output)
        print(f"wrote {len(frame)} rows to {args.output}")
    print(_summary(frame).to_string(float_format=lambda v: f"{v:.4g}"))


def _summary(frame):
    """Last snapshot per matrix: ranks of ΔW_t and W_t, and stability against the previous."""
    last = frame[frame["step"] == frame["step"].max()]
    wanted = {("effective_rank", "updates"): "erank ΔW", ("effective_rank", "weights"): "erank W",
              ("stable_rank", "updates"): "stable ΔW", ("numerical_rank", "weights"): "num. rank W",
              ("oialr_stability_prev", "weights"): "stability W"}
    table = last.pivot_table(index="param", columns=["metric", "target"], values="value",
                             observed=True, sort=False)
    columns = [c for c in wanted if c in table.columns]
    table = table[columns]
    table.columns = [wanted[c] for c in columns]
    table.index.name = f"step {int(last['step'].iloc[0])}"
    return table


def _write_frame(frame, path: Path) -> None:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"--output {path}: use a .csv or .parquet file name")


def _plot(args: argparse.Namespace) -> None:
    from spectra import plot
    frames = {}
    for store in args.stores:
        frames[store.stem] = frame = _analyzed(store, args)
        for path in plot.run_figures(frame, args.out, store.stem):
            print(f"wrote {path}")
    if len(frames) > 1:
        for target in args.targets:
            try:
                fig = plot.compare_runs(frames, metric=args.metric, target=target)
            except ValueError as exc:  # e.g. runs of different models
                print(f"no comparison figure: {exc}")
                break
            print(f"wrote {plot.save(fig, args.out / f'compare-{args.metric}-{target}.png')}")


def _train(args: argparse.Namespace) -> None:
    from spectra.experiments import gpt_run, mlp_run
    from spectra.train import ClassifierTraining, GPTTraining
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


def _theory(args: argparse.Namespace) -> int:
    import torch

    from spectra.theory.report import write_outputs
    from spectra.theory.suite import SWEEP_ALPHAS, run_suite
    torch.set_num_threads(args.threads)
    teacher = _numbers(args.teacher, "--teacher")
    alphas = _numbers(args.alphas, "--alphas") if args.alphas else SWEEP_ALPHAS
    result = run_suite(args.out, depth=args.depth, alpha=args.alpha, optimizer=args.optimizer,
                       width=args.width, teacher=teacher, seed=args.seed, alphas=alphas,
                       quiet=args.quiet)
    print(write_outputs(result, args.out))
    return 0 if all(row.agrees is not False for row in result.rows) else 1


def _numbers(text: str, option: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers") from None


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


def _info(args: argparse.Namespace) -> None:
    from spectra.store import open_run
    run = open_run(args.store)
    meta = run.attrs
    print(f"{run.path}  ({_size(run.path)} on disk)")
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


if __name__ == "__main__":
    sys.exit(main())
