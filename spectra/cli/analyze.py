"""`spectra analyze` and `spectra plot`: metrics of stores, and their figures."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    analyze = commands.add_parser("analyze", help="spectral metrics of a store (cached in it)")
    analyze.add_argument("store", type=Path)
    analyze.add_argument("-o", "--output", type=Path, help="write the frame (.csv or .parquet)")
    _analysis_options(analyze)
    analyze.set_defaults(func=_analyze)

    plot = commands.add_parser("plot", help="figures of one or more stores (named by the "
                               "store, with its folders where names repeat)")
    plot.add_argument("stores", type=Path, nargs="+")
    plot.add_argument("-o", "--out", type=Path, required=True, help="folder for the PNGs")
    plot.add_argument("--metric", default="effective_rank", help="metric compared across runs")
    _analysis_options(plot)
    plot.set_defaults(func=_plot)


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=8, help="top-k subspace size (0: values only)")
    parser.add_argument("--targets", nargs="+", default=["updates", "weights"],
                        choices=["updates", "weights"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cache", help="keep the SVD cache here instead of inside the store")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="analyze on a local dask cluster of N single-threaded workers")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="analyze on the dask cluster whose scheduler is at ADDRESS")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _analyzed(store: Path, args: argparse.Namespace, client=None):
    from spectra.analysis.analyzer import analyze
    return analyze(store, targets=args.targets, k=args.k, device=args.device, quiet=args.quiet,
                   client=client, cache=args.cache)


@contextlib.contextmanager
def _client(args: argparse.Namespace):
    """The dask client the options ask for (None without --workers / --scheduler)."""
    if args.workers is None and args.scheduler is None:
        yield None
        return
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers and --scheduler need dask: pip install "
                         "'spectra-dynamics[dask]'") from None
    if args.scheduler is not None:
        with Client(args.scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _analyze(args: argparse.Namespace) -> None:
    with _client(args) as client:
        frame = _analyzed(args.store, args, client)
    if frame.empty:
        raise ValueError(f"{args.store} has no committed snapshot yet: nothing to analyze "
                         "(record at least one)")
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
    labels = plot.run_labels(args.stores)
    with _client(args) as client:
        for store, label in zip(args.stores, labels):
            frames[label] = _analyzed(store, args, client)
    for label, frame in frames.items():
        for path in plot.run_figures(frame, args.out, label):
            print(f"wrote {path}")
    if len(frames) > 1:
        for target in args.targets:
            try:
                fig = plot.compare_runs(frames, metric=args.metric, target=target)
            except ValueError as exc:  # e.g. runs of different models
                print(f"no comparison figure: {exc}")
                break
            print(f"wrote {plot.save(fig, args.out / f'compare-{args.metric}-{target}.png')}")
