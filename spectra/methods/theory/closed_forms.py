"""Predictions for a teacher mode of a deep linear network trained by gradient flow.

Units: time t in optimizer steps, τ = 1/η steps (gradient descent with learning rate η on the
loss ½‖W − T‖²_F is the Euler discretisation of τ dW_l/dt = −∂L/∂W_l). A mode i of the teacher
T = U diag(s) Vᵀ is tracked through its projection m_i(t) = u_iᵀ W(t) v_i, W = W_D ··· W_1.

Aligned start (every mode of W_0 along the teacher's, strength u_0; Saxe et al. 2014): each mode
evolves alone, τ dm/dt = D·m^{2(D−1)/D}·(s − m). For D = 2 this integrates to

    m(t) = s·e^{2st/τ} / (e^{2st/τ} − 1 + s/u_0)                       (``saxe_depth2``)

Random orthogonal start (W_l = α·orthogonal: square layers are then balanced,
W_{l+1}ᵀW_{l+1} = W_l W_lᵀ, and W follows the end-to-end flow of Arora et al. 2018, whose rate
along a mode is D·σ^{2(D−1)/D} with σ the singular value there; a wider hidden layer is balanced
only approximately). The mode starts at m_0 = u_iᵀ W_0 v_i, a random fraction of α^D, and W_0 is
not aligned with it. We use the reduced flow

    τ dm/dt = D·(m² + α^{2D} − m_0²)^{(D−1)/D}·(s − m),    m(0) = m_0    (``mode_rate``)

i.e. σ² = m² + (α^{2D} − m_0²). For D = 2 it is exact while the mode is small: the linearised
flow gives m(t) = α²·sinh(2st/τ) + m_0·cosh(2st/τ), which satisfies (τ ṁ / 2s)² = m² + α⁴ − m_0²,
so the mode escapes as if aligned from u_eff = (α² + m_0)/2 (the c = 2α²/(α² + m_0) of docs/architecture.md §5 in
t50 ≈ (τ/2s)·ln(c·s/α²)). For D ≥ 3 it is an interpolation between that start and the aligned
flow; for D = 3 and α → 0 it gives t_50 → C·τ/(s·α) with C = (1/3)·∫_c^∞ (x² + 1 − c²)^{−2/3} dx
(c = m_0/α³), C = B(1/2, 1/6)/6 = 1.214 at c = 0. Aligned starts (m_0 = α^D) recover the exact
aligned flow. Checked against simulated gradient descent in tests/test_theory.py and
docs/theory.md: t_50 within 5% for α ≤ 0.3 at hidden width 32 (8× the teacher rank); at width 8
the modes compete for hidden directions and the weakest arrives up to 43% late.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import integrate


def saxe_depth2(t: np.ndarray, s: float, u0: float, tau: float) -> np.ndarray:
    """Saxe et al. 2014: the aligned depth-2 mode, m(t) for t (steps) given s, u_0 > 0, τ."""
    growth = np.exp(2.0 * s * np.asarray(t, dtype=np.float64) / tau)
    return s * growth / (growth - 1.0 + s / u0)


def mode_rate(m: np.ndarray, s: float, m0: float, alpha: float, depth: int) -> np.ndarray:
    """τ·dm/dt of the reduced flow (module docstring) at projection m. Units of s per τ."""
    floor = max(alpha ** (2 * depth) - m0**2, 0.0)
    return depth * (np.asarray(m) ** 2 + floor) ** ((depth - 1) / depth) * (s - np.asarray(m))


def crossing_time(fraction: float, s: float, m0: float, alpha: float, depth: int,
                  tau: float) -> float:
    """Steps until the reduced flow reaches m = fraction·s (0 if it starts there; inf if it
    never leaves a saddle: an exactly anti-aligned start).

    τ·∫ dm / rate(m), integrated in u with m = b·sinh(u), b² = α^{2D} − m_0² (or m = e^u for an
    aligned start, b = 0), where the integrand is smooth however small α is.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r}; must be in (0, 1)")
    level = fraction * s
    if m0 >= level:
        return 0.0
    b = math.sqrt(max(alpha ** (2 * depth) - m0**2, 0.0))
    if b > 0:
        m, dm, bounds = (lambda u: b * math.sinh(u)), (lambda u: b * math.cosh(u)), (
            math.asinh(m0 / b), math.asinh(level / b))
    elif m0 > 0:
        m, dm, bounds = math.exp, math.exp, (math.log(m0), math.log(level))
    else:
        return float("inf")
    value, _ = integrate.quad(lambda u: dm(u) / mode_rate(m(u), s, m0, alpha, depth), *bounds,
                              limit=200)
    return tau * value


def mode_trajectory(t: np.ndarray, s: float, m0: float, alpha: float, depth: int,
                    tau: float) -> np.ndarray:
    """m(t) of the reduced flow at the steps ``t`` (ascending, from 0)."""
    t = np.asarray(t, dtype=np.float64)
    solution = integrate.solve_ivp(lambda _, m: mode_rate(m, s, m0, alpha, depth) / tau,
                                   (0.0, float(t[-1])), [m0], t_eval=t, method="LSODA",
                                   rtol=1e-9, atol=1e-12 * s)
    return solution.y[0]


def plateau_losses(s: Sequence[float]) -> np.ndarray:
    """½·Σ_{j>k} s_j² for k = 1..r−1: the loss once the top k modes are learned and the
    others not yet (teacher values ``s``, descending). (r−1,)."""
    s = np.asarray(s, dtype=np.float64)
    tail = np.cumsum((s**2)[::-1])[::-1]
    return 0.5 * tail[1:]
