"""Analysis: a run store in, tidy per-layer, per-step spectral metrics out (analyzer), with the
SVDs cached in the store (cache)."""

from spectra.analysis.analyzer import COLUMNS, TARGETS, analyze, singular_values

__all__ = ["COLUMNS", "TARGETS", "analyze", "singular_values"]
