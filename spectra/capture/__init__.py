"""Capture: which matrices of a model to record (selection), when (schedules), and the
Recorder that snapshots them into a run store while the model trains (recorder)."""
