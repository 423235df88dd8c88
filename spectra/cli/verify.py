"""`spectra verify` and `spectra repair`: check every chunk of a store; cut a damaged one back
to its last intact snapshot (only with --cut)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser("verify", help="check every chunk of a run store (exit status "
                                 "0: intact, 2: damaged)")
    verify.add_argument("store", help="a run store (path or URL)")
    verify.set_defaults(func=_verify)

    repair = commands.add_parser("repair", help="say how a damaged store would be repaired; "
                                 "with --cut, keep its intact leading snapshots")
    repair.add_argument("store", help="a run store (path or URL)")
    repair.add_argument("--cut", action="store_true",
                        help="cut the store back to its last intact snapshot (drops the rest)")
    repair.set_defaults(func=_repair)


def _verify(args: argparse.Namespace) -> int:
    from spectra.store import verify_run
    report = verify_run(args.store)
    print("\n".join(report.lines()))
    return 0 if report.ok else 2


def _repair(args: argparse.Namespace) -> int:
    from spectra.store import repair_run
    report = repair_run(args.store, cut=args.cut)
    if report.ok:
        print(f"{report.location}: intact ({report.snapshots} snapshots); nothing to repair")
        return 0
    print("\n".join(report.lines()[:-1]))
    if not report.repairable:
        print(report.lines()[-1])
        return 2
    dropped = report.snapshots - report.intact
    if args.cut:
        print(f"{report.location}: cut back from {report.snapshots} to {report.intact} snapshots "
              f"({dropped} dropped; recorded in attrs['spectra']['repairs'])")
        return 0
    print(f"{report.location}: nothing changed. `spectra repair {report.location} --cut` keeps "
          f"the first {report.intact} snapshots and drops the last {dropped}")
    return 2
