"""Measure a recorded toy run: the store in, the quantities the checks compare out.

Everything comes from the run store written by spectra.methods.theory.training.train: the setting and
the teacher from its attrs, W_t from ``run.weights("product.weight")`` (and with it the loss
½‖W_t − T‖²_F, exact on whitened inputs, also for SGD whose recorded loss is a batch's), and
the spectra through the ordinary analysis code (spectra.analysis.analyzer for the singular
values of ΔW_t = W_t − W_0, spectra.core.linalg + spectra.core.metrics for subspace angles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spectra.core import metrics
from spectra.analysis.analyzer import analyze, singular_values
from spectra.core.linalg import batched_svd
from spectra.store import open_run
from spectra.methods.theory.closed_forms import crossing_time
from spectra.methods.theory.linear_nets import Teacher
from spectra.methods.theory.training import Setting

PRODUCT = "product.weight"


@dataclass(frozen=True)
class Trajectory:
    """One measured run. T snapshots, r = teacher rank, dim = the product's size.

    steps (T,) int: snapshot steps. loss (T,): ½‖W_t − T‖²_F. modes (T, r): u_iᵀ W_t v_i, the
    projection of the product on each teacher mode. update_sv (T, dim): singular values of
    ΔW_t = W_t − W_0 of the product, all of them. frame: the analyze() frame (with
    ``layers=True`` every recorded matrix, updates and weights; else the product's updates).
    """

    path: Path
    setting: Setting
    teacher: Teacher
    steps: np.ndarray
    loss: np.ndarray
    modes: np.ndarray
    update_sv: np.ndarray
    frame: pd.DataFrame

    @property
    def s(self) -> np.ndarray:
        """The teacher's nonzero singular values (r,)."""
        return self.teacher.s[: self.teacher.rank]

    @property
    def m0(self) -> np.ndarray:
        """Each mode's projection on W_0 (r,)."""
        return self.modes[0]

    def crossing(self, fraction: float) -> np.ndarray:
        """Measured step at which each mode's projection first reaches fraction·s_i (r,),
        interpolated between snapshots; NaN if it never does within the run."""
        return np.array([first_crossing(self.steps, self.modes[:, i], fraction * s)
                         for i, s in enumerate(self.s)])

    def predicted_crossing(self, fraction: float) -> np.ndarray:
        """Closed-form (reduced-flow) step for the same event, from each mode's own start m_0
        and τ = 1/lr (r,). Meaningful for gradient descent (and SGD on average)."""
        setting = self.setting
        return np.array([crossing_time(fraction, s, m0, setting.alpha, setting.depth,
                                       setting.tau) for s, m0 in zip(self.s, self.m0)])

    def update_rank(self, threshold: float) -> np.ndarray:
        """#{j: σ_j(ΔW_t) > threshold} at each snapshot (T,)."""
        return (self.update_sv > threshold).sum(axis=1)

    def alignment_degrees(self, k: int, step_index: int) -> tuple[float, float]:
        """Largest principal angles (degrees) between the top-k left / right singular subspaces
        of ΔW at snapshot ``step_index`` and the teacher's top-k ones."""
        update = open_run(self.path).updates(PRODUCT, step_index)
        svd = batched_svd(update[None], compute="topk", k=k)
        left = metrics.largest_principal_angle(self.teacher.u[:, :k], svd.U[0])
        right = metrics.largest_principal_angle(self.teacher.v[:, :k], svd.Vh[0].T)
        return float(np.degrees(left)), float(np.degrees(right))


def load(path: str | Path, *, layers: bool = False) -> Trajectory:
    """Measure the store at ``path`` (written by spectra.methods.theory.training.train)."""
    run = open_run(path)
    theory = run.attrs.get("theory")
    if theory is None:
        raise ValueError(f"{run.path}: not a toy linear-network run (no 'theory' attrs); "
                         "record it with spectra.methods.theory.training.train")
    setting = Setting(**theory["setting"])
    teacher = Teacher.from_json(theory["teacher"])
    r = teacher.rank
    weights = run.weights(PRODUCT)
    modes = np.einsum("ik,tij,jk->tk", teacher.u[:, :r], weights, teacher.v[:, :r])
    frame = analyze(run, k=0, quiet=True, params=None if layers else [PRODUCT],
                    targets=("updates", "weights") if layers else ("updates",))
    _, update_sv = singular_values(run, PRODUCT, "updates", k=0)  # cached by analyze()
    loss = 0.5 * ((weights - teacher.matrix) ** 2).sum(axis=(1, 2))
    return Trajectory(path=run.path, setting=setting, teacher=teacher, steps=run.steps,
                      loss=loss, modes=modes, update_sv=update_sv, frame=frame)


def first_crossing(steps: np.ndarray, values: np.ndarray, level: float) -> float:
    """The first step at which ``values`` (T,) reaches ``level``, linearly interpolated between
    snapshots ``steps`` (T,); steps[0] if it starts there, NaN if it never does."""
    above = np.flatnonzero(values >= level)
    if above.size == 0:
        return float("nan")
    i = above[0]
    if i == 0:
        return float(steps[0])
    fraction = (level - values[i - 1]) / (values[i] - values[i - 1])
    return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))
