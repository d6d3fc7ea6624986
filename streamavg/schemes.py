"""Averaging schemes: pure functions from (scheme, n) to normalised weights.

Weights are listed chronologically (oldest first). Following the tutorial, the
checkpoints are numbered newest first, i = 1..n, so the newest weighs most.

>>> scheme_weights("equal", 4).tolist()
[0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .choices import SCHEMES
from .errors import UsageError, option


def scheme_weights(
    scheme: str, n: int, *, alpha: float = 2.0, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Float64 weights for `n` checkpoints, oldest first, normalised to sum to 1.

    equal: 1/n each; linear: n/n for the newest down to 1/n for the oldest;
    exp: exp(-i/alpha). Explicit `weights` (oldest first) override `scheme`.
    """
    if n < 1:
        raise UsageError("no checkpoints to average")
    i = np.arange(n, 0, -1, dtype=np.float64)  # the newest-first index, listed oldest first
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise UsageError(f"{option('weights')} gives {w.size} weights for {n} checkpoints")
        if not np.isfinite(w).all() or (w < 0).any():
            raise UsageError(f"{option('weights')} must be finite and non-negative")
        if not 0 < w.sum() < np.inf:
            raise UsageError(f"{option('weights')} must have a positive, finite sum")
    elif scheme == "equal":
        w = np.ones(n)
    elif scheme == "linear":
        w = (n + 1 - i) / n
    elif scheme == "exp":
        if not (np.isfinite(alpha) and alpha > 0):
            raise UsageError(f"{option('alpha')} must be a positive number, got {alpha}")
        w = np.exp(-(i - 1) / alpha)  # exp(-i/alpha) scaled so the newest is 1: no underflow to 0/0
    else:
        raise UsageError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    return w / w.sum()


def fold_weights(scheme: str, weights: Sequence[float]) -> np.ndarray:
    """What the fold multiplies the checkpoints by (oldest first): the scheme's integers for
    equal (1 each) and linear (1..n), with which products and sums of stored floats are
    exact in float64 and the one division by their sum rounds the mean correctly; the
    normalised `weights` for the others.

    >>> fold_weights("linear", scheme_weights("linear", 3)).tolist()
    [1.0, 2.0, 3.0]
    """
    n = len(weights)
    if scheme == "equal":
        return np.ones(n)
    if scheme == "linear":
        return np.arange(1, n + 1, dtype=np.float64)
    return np.asarray(weights, dtype=np.float64)
