"""Post-hoc EMA (Karras et al., EDM2, 2024): pure maths for choosing the EMA length after
training, from snapshots of power-function EMAs.

A power-function EMA with exponent gamma averages the weights of steps 1..t with weights
growing as tau ** gamma; after step t its decay is ``(1 - 1/t) ** (gamma + 1)``. Its width
relative to t is sigma_rel. A snapshot is such an average at step t, a profile over
[0, t]; any other profile is approximated by the combination of snapshots nearest to it
in L2, whose weights `solve` finds.

>>> round(gamma(0.10), 4)  # EDM2: sigma_rel 0.10 is gamma 6.94
6.9372
>>> solve([(100, gamma(0.05)), (100, gamma(0.10))], 100, gamma(0.05)).round(6).tolist()
[1.0, -0.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UsageError

SNAPSHOT_ATTR = "streamavg_phema"  # a snapshot file's sigma_rel, gamma and step (JSON)
MAX_SIGMA_REL = 12**-0.5  # gamma = 0 (an equal average of every step); wider has no gamma >= 0


def check_sigma_rel(sigma_rel: float) -> float:
    """`sigma_rel` if it lies in (0, 1/sqrt(12)), where a power-function EMA has it."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UsageError(f"sigma_rel must be between 0 and {MAX_SIGMA_REL:.4f}; got {sigma_rel}")
    return float(sigma_rel)


def gamma(sigma_rel: float) -> float:
    """The exponent of the power-function EMA of relative width `sigma_rel`: the largest
    real root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)."""
    s = check_sigma_rel(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def decay(t: int, gamma: float) -> float:
    """The decay after step t (counted from 1): (1 - 1/t) ** (gamma + 1); 0 at t = 1."""
    return (1 - 1 / t) ** (gamma + 1)


def inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """The inner product of the normalised profiles of snapshots (t_a, g_a) and (t_b, g_b)
    (EDM2, appendix): arrays broadcast."""
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*map(np.float64, (t_a, g_a, t_b, g_b)))
    power = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** power / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve(snapshots: Sequence[tuple[int, float]], t: int, target_gamma: float) -> np.ndarray:
    """Weights, summing to 1, of the snapshots ((step, gamma) each) whose combination is
    the least-squares nearest to the power-function EMA of `target_gamma` at step `t`.
    Weights may be negative."""
    steps, gammas = (np.array(column, dtype=np.float64) for column in zip(*snapshots, strict=True))
    a = inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = inner(steps, gammas, t, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()
