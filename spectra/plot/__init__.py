"""Figures from tidy frames (never from a store): runs (spectra.plot.runs) and the theory
suite (spectra.plot.theory). Every function returns a matplotlib Figure; ``save`` writes one.

The backend is left to matplotlib (Agg where there is no display): importing this package
never changes it.
"""

from spectra.plot.runs import (LABELS, TARGET_COLORS, compare_runs, rank_curves, run_figures,
                               run_labels, save, singular_values, stability_heatmap)
from spectra.plot.theory import modes_figure, sweep_figure

__all__ = ["LABELS", "TARGET_COLORS", "compare_runs", "modes_figure", "rank_curves",
           "run_figures", "run_labels", "save", "singular_values", "stability_heatmap",
           "sweep_figure"]
