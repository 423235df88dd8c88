"""Trainer integrations: callbacks that drive a spectra Recorder from a training framework.
Each module imports its framework lazily, so spectra never requires it."""
