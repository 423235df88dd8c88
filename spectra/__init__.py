"""spectra: record how weight matrices move during training, and measure their spectra."""

from spectra.record import Recorder
from spectra.store import open_run

__all__ = ["Recorder", "open_run"]
__version__ = "0.1.0"
