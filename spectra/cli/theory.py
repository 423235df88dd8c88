"""`spectra theory`: the GLRL checks C1-C6 on deep linear networks."""

from __future__ import annotations

import argparse
from pathlib import Path

from spectra.cli.options import add_threads


def register(commands: argparse._SubParsersAction) -> None:
    theory = commands.add_parser("theory", help="check incremental-rank learning on deep "
                                 "linear networks against closed forms (C1-C6)")
    theory.add_argument("--depth", type=int, default=3, help="weight matrices D")
    theory.add_argument("--alpha", type=float, default=0.1, help="init scale α")
    theory.add_argument("--optimizer", choices=["gd", "sgd", "adam"], default="gd",
                        help="full-batch gradient descent, mini-batch SGD or Adam")
    theory.add_argument("--width", type=int, default=32, help="hidden width")
    theory.add_argument("--teacher", default="8,4,2,1",
                        help="the teacher's distinct singular values")
    theory.add_argument("--seed", type=int, default=0, help="teacher, data and initialisation")
    theory.add_argument("--alphas", default="0.05,0.1,0.2,0.3,0.5,0.7,1",
                        help="init scales of the sweep (C2 slope, C4 vs α, C6)")
    theory.add_argument("--out", type=Path, default=Path("runs/theory"),
                        help="folder for the stores, the table and the figures")
    add_threads(theory)
    theory.add_argument("--quiet", action="store_true", help="no progress bars")
    theory.set_defaults(func=_theory)


def _theory(args: argparse.Namespace) -> int:
    from spectra.methods.theory.suite import run_suite
    teacher = _numbers(args.teacher, "--teacher")
    alphas = _numbers(args.alphas, "--alphas")
    result = run_suite(args.out, depth=args.depth, alpha=args.alpha, optimizer=args.optimizer,
                       width=args.width, teacher=teacher, seed=args.seed, alphas=alphas,
                       quiet=args.quiet, threads=args.threads)
    print(_write_outputs(result, args.out))
    return 0 if all(row.agrees is not False for row in result.rows) else 1


def _write_outputs(result, folder: Path) -> str:
    """Write theory-checks.csv, theory-modes-d<D>.png (main run and its other-depth twin) and
    theory-sweep.png into ``folder``; return the table and the list of files as text."""
    from spectra import plot
    from spectra.methods.theory import report
    files = [report.write_table(result.rows, folder / "theory-checks.csv")]
    for run in (result.main, result.companion):
        figure = plot.modes_figure(report.modes_frame(run))
        files.append(plot.save(figure, folder / f"theory-modes-d{run.setting.depth}.png"))
    files.append(plot.save(plot.sweep_figure(report.sweep_frame(result.sweep)),
                           folder / "theory-sweep.png"))
    listing = "\n".join(f"wrote {path}" for path in files)
    return (f"{report.format_table(result.rows)}\n{len(result.runs)} runs recorded and checked "
            f"in {result.seconds:.0f} s (stores in {folder})\n{listing}")


def _numbers(text: str, option: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers") from None
