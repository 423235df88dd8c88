"""spectra: record how weight matrices move during training, and measure their spectra.

    import spectra
    with spectra.Recorder(model, "runs/my-run.zarr", every=10) as rec: ...
    spectra.import_checkpoints("out/", "runs/from-checkpoints.zarr")   # checkpoints you have
    run = spectra.open_run("runs/my-run.zarr")
    frame = spectra.analyze("runs/my-run.zarr", k=8)

Layers, lowest first (a module imports only from layers below its own; docs/architecture.md):
core (metrics, linalg) → store → capture | analysis → methods | integrations → tasks | plot →
cli. ``import spectra`` loads none of them: the names below are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

__version__ = "0.1.0"
__all__ = ["Recorder", "analyze", "import_checkpoints", "open_run"]

_EXPORTS = {
    "Recorder": "spectra.capture.recorder",
    "analyze": "spectra.analysis.analyzer",
    "import_checkpoints": "spectra.capture.checkpoints",
    "open_run": "spectra.store.reader",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


class _DeprecatedAnalyzeModule(types.ModuleType):
    """``spectra.analyze`` as a module path (``from spectra.analyze import analyze``), kept
    for old code: it forwards to spectra.analysis.analyzer with a DeprecationWarning, while the
    attribute ``spectra.analyze`` is the function."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("the module path spectra.analyze is deprecated; use spectra.analyze(...) "
                      "or spectra.analysis", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("spectra.analysis.analyzer"), name)


sys.modules.setdefault(f"{__name__}.analyze", _DeprecatedAnalyzeModule(f"{__name__}.analyze"))
