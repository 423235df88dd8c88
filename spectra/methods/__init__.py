"""Methods built on the lower layers: low-rank training (inrank, oialr, with the registry that
`spectra train` uses) and the theory checks on deep linear networks (theory)."""

from spectra.methods.registry import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "build_method"]
