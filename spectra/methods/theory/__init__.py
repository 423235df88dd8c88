"""Theory checks on deep linear networks: is learning incremental in rank, and where not?

docs/architecture.md §5. A deep linear network y = W_D ··· W_1 x learns a teacher T = U diag(s) Vᵀ from
whitened inputs; each run is recorded with the ordinary Recorder (every layer and the
end-to-end product) and measured with the ordinary analysis code; checks C1–C6 compare the
measurements with closed-form predictions.

    from spectra.methods.theory import Setting, train, load, run_suite
    train(Setting(depth=3, alpha=0.1), "runs/theory/d3.zarr")
    run = load("runs/theory/d3.zarr")
    run.crossing(0.5), run.predicted_crossing(0.5)        # t50 per mode, measured / predicted

Modules: linear_nets (network, teacher, data, init), closed_forms (predictions), training
(Setting, train), measure (store → Trajectory), checks (C1–C6), suite (the default suite),
report (table and figures).
"""

from spectra.methods.theory.checks import CheckResult
from spectra.methods.theory.measure import Trajectory, load
from spectra.methods.theory.suite import SuiteResult, run_suite
from spectra.methods.theory.training import Setting, train

__all__ = ["CheckResult", "Setting", "SuiteResult", "Trajectory", "load", "run_suite", "train"]
