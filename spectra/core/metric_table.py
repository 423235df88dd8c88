"""The metric table: every metric ``spectra.analyze`` reports, in one place.

Each row names a metric as it appears in the frame's ``metric`` column, the function of
spectra.core.metrics that computes it, its axis label, its unit and a one-line description.
``analyze`` computes its columns from this table, ``spectra.plot`` labels its axes from it
(:func:`labels`), and the README's metric table is generated from it (:func:`markdown`; a test
keeps the README in sync: ``python -m spectra.core.metric_table README.md`` rewrites it).

A metric reads one of three things (``reads``):

- ``"values"``: all singular values of one snapshot, ``function(s, **{a: context[a] for a in
  arguments})`` with s (T, r); the context holds ``shape``, ``dtype``, ``tau``, ``alpha``.
  ``family`` rows expand to ``sigma_1 … sigma_<n_values>``, ``function(s, i)``.
- ``"bases"``: the top-k singular bases of two snapshots, compared as ``function(reference,
  now)`` on the left bases U (``side="left"``), the right bases V (``"right"``) or both
  (``"both"``: ``function(U_ref, Vh_ref, U, Vh)``); one frame metric per comparison in
  ``against``: ``<name>_prev`` (the previous snapshot) and ``<name>_last`` (the last one).
- ``"polar"``: the full bases of two snapshots (all min(m, n) triplets), computed by
  spectra.core.series while the SVDs are made; ``function`` is its definition.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spectra.core import metrics

AGAINST_LABELS = {"prev": "vs previous", "last": "vs last"}


@dataclass(frozen=True)
class Metric:
    name: str
    function: Callable
    label: str
    unit: str
    description: str
    reads: str = "values"
    arguments: tuple[str, ...] = ()
    side: str = ""
    against: tuple[str, ...] = ()
    family: bool = False

    def names(self, n_values: int = 8) -> list[str]:
        """The frame's metric names for this row."""
        if self.family:
            return [self.name.replace("_i", f"_{i}") for i in range(1, n_values + 1)]
        if self.against:
            return [f"{self.name}_{suffix}" for suffix in self.against]
        return [self.name]


METRICS: tuple[Metric, ...] = (
    Metric("effective_rank", metrics.effective_rank, "effective rank", "count",
           "exp of the entropy of σ/Σσ (Roy & Vetterli 2007)"),
    Metric("stable_rank", metrics.stable_rank, "stable rank", "count", "Σσ² / σ₁²"),
    Metric("numerical_rank", metrics.numerical_rank, "numerical rank", "count",
           "#{σ > max(m, n)·eps·σ₁}, eps of the parameter's dtype",
           arguments=("shape", "dtype")),
    Metric("explained_variance_rank", metrics.explained_variance_rank,
           "explained-variance rank", "count",
           "smallest k with Σ_{i≤k}σ² ≥ τ·Σσ² (τ = 0.9)", arguments=("tau",)),
    Metric("inrank_rank", metrics.inrank_rank, "InRank rank", "count",
           "InRank's rule: first j with 1 − Var(σ·1[i>j]) / Var(σ) > α (α = 0.9)",
           arguments=("alpha",)),
    Metric("frobenius_norm", metrics.frobenius_norm, "Frobenius norm", "weight units",
           "‖A‖_F = √Σσ²"),
    Metric("spectral_norm", metrics.spectral_norm, "spectral norm", "weight units", "σ₁"),
    Metric("nuclear_norm", metrics.nuclear_norm, "nuclear norm", "weight units", "Σσ"),
    Metric("condition_number", metrics.condition_number, "condition number", "ratio",
           "σ₁ / σ_min (inf when singular)"),
    Metric("sigma_i", metrics.singular_value, "σ_i", "weight units",
           "the i-th largest singular value, i ≤ n_values (8)", family=True),
    Metric("left_similarity", metrics.subspace_similarity, "top-k left similarity", "fraction",
           "‖AᵀB‖²_F / k of the top-k left singular subspaces (1 = same, ≈ k/d = chance)",
           reads="bases", side="left", against=("prev", "last")),
    Metric("right_similarity", metrics.subspace_similarity, "top-k right similarity", "fraction",
           "the same for the right singular subspaces", reads="bases", side="right",
           against=("prev", "last")),
    Metric("left_angle", metrics.largest_principal_angle, "largest left principal angle",
           "radians", "largest principal angle between the top-k left subspaces (accurate "
           "to 1e-12 for tiny angles)", reads="bases", side="left", against=("prev", "last")),
    Metric("right_angle", metrics.largest_principal_angle, "largest right principal angle",
           "radians", "the same for the right subspaces", reads="bases", side="right",
           against=("prev", "last")),
    Metric("oialr_stability", metrics.oialr_stability, "OIALR stability", "cosine",
           "OIALR's basis stability: mean cosine of matching columns of U·Vᵀ, all "
           "min(m, n) columns (1 = unchanged)", reads="polar", against=("prev",)),
    Metric("topk_stability", metrics.oialr_stability, "top-k stability", "cosine",
           "the same restricted to the top-k triplets", reads="bases", side="both",
           against=("prev", "last")),
)


def labels(n_values: int = 8) -> dict[str, str]:
    """Frame metric name → axis label, for every metric of the table."""
    out = {}
    for metric in METRICS:
        for name in metric.names(n_values):
            label = metric.label
            if metric.family:
                label = label.replace("_i", name.removeprefix("sigma"))
            for suffix, words in AGAINST_LABELS.items():
                if name.endswith(f"_{suffix}") and metric.against:
                    label = f"{label} {words}"
            out[name] = label
    return out


def markdown() -> str:
    """The README's metric table (markdown)."""
    rows = ["| metric | unit | meaning |", "|---|---|---|"]
    for metric in METRICS:
        names = ["sigma_1", "…", "sigma_8"] if metric.family else metric.names()
        shown = ", ".join(name if name == "…" else f"`{name}`" for name in names)
        rows.append(f"| {shown} | {metric.unit} | {metric.description} |")
    return "\n".join(rows)


_MARKERS = ("<!-- metric-table -->", "<!-- /metric-table -->")


def readme_block(text: str) -> str:
    """The metric table between the README's markers."""
    return _block(text).group(1)


def _block(text: str) -> re.Match:
    match = re.search(f"{_MARKERS[0]}\n(.*?)\n{_MARKERS[1]}", text, re.S)
    if match is None:
        raise ValueError(f"no {_MARKERS[0]} … {_MARKERS[1]} block in the README")
    return match


def rewrite(text: str) -> str:
    """``text`` with the span between the markers (only there) replaced by :func:`markdown`."""
    span = _block(text).span(1)
    return text[:span[0]] + markdown() + text[span[1]:]


def _rewrite(path: Path) -> None:
    path.write_text(rewrite(path.read_text()))


if __name__ == "__main__":
    _rewrite(Path(sys.argv[1]))
