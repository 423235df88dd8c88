"""Checkpoints into run stores: :func:`import_checkpoints` (importer) reads a series of
checkpoints (sources: torch files, safetensors, HuggingFace folders; steps: which step each is)
and describes their tensors to the Recorder's matrix rules (architecture)."""

from spectra.capture.checkpoints.importer import import_checkpoints

__all__ = ["import_checkpoints"]
