"""Property tests of the post-hoc EMA maths (streamavg.posthoc)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamavg.errors import UsageError
from streamavg.posthoc import MAX_SIGMA_REL, decay, gamma, inner, solve

sigma_rels = st.floats(0.01, 0.28)
steps = st.integers(1, 10**6)


def residual(snapshots, weights, t, g) -> float:
    """The squared L2 distance between the combined snapshots' profile and the target's,
    relative to the target's squared norm."""
    ts, gs = (np.array(c, dtype=float) for c in zip(*snapshots, strict=True))
    a = inner(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    b = inner(ts, gs, t, g)
    norm = inner(t, g, t, g)
    return float((weights @ a @ weights - 2 * weights @ b + norm) / norm)


@given(sigma_rels)
def test_gamma_gives_a_profile_of_that_relative_width(s):
    g = gamma(s)
    mean = (g + 1) / (g + 2)  # of tau / t under the density (g + 1) tau^g / t^(g + 1)
    assert math.isclose(math.sqrt((g + 1) / (g + 3) - mean**2), s, rel_tol=1e-9)


@pytest.mark.parametrize("s", [0.0, -0.1, MAX_SIGMA_REL, 0.3, math.nan])
def test_sigma_rel_outside_its_range_is_refused(s):
    with pytest.raises(UsageError) as e:
        gamma(s)
    assert str(e.value) == f"sigma_rel must be between 0 and 0.2887; got {s}"


@given(steps, steps, st.floats(0, 50), st.floats(0, 50))
def test_inner_products_are_symmetric_and_give_the_profiles_norm(t_a, t_b, g_a, g_b):
    assert math.isclose(inner(t_a, g_a, t_b, g_b), inner(t_b, g_b, t_a, g_a), rel_tol=1e-12)
    assert math.isclose(inner(t_a, g_a, t_a, g_a), (g_a + 1) ** 2 / ((2 * g_a + 1) * t_a))


@given(st.integers(1, 300), st.floats(0, 30))
def test_the_decays_weigh_step_tau_as_the_power_function_says(t, g):
    weights = np.zeros(t)
    for step in range(1, t + 1):  # the EMA recurrence on one-hot "weights"
        weights *= decay(step, g)
        weights[step - 1] += 1 - decay(step, g)
    tau = np.arange(1, t + 1, dtype=float)
    closed = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
    np.testing.assert_allclose(weights, closed, rtol=1e-9, atol=1e-15)


snapshot_sets = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from([0.05, 0.10])),
    min_size=1,
    max_size=16,
    unique=True,
)


@settings(deadline=None)
@given(snapshot_sets, st.data())
def test_a_stored_profile_is_reconstructed_almost_exactly(chosen, data):
    snapshots = [(every * 50, gamma(s)) for every, s in chosen]
    t, g = data.draw(st.sampled_from(snapshots))
    weights = solve(snapshots, t, g)
    assert residual(snapshots, weights, t, g) < 1e-6
    assert math.isclose(weights.sum(), 1.0, rel_tol=1e-12)


@settings(deadline=None)
@given(st.integers(2, 40), st.floats(0.05, 0.10))
def test_weights_at_a_fixed_step_sum_to_one_and_beat_either_profile(n, s):
    """Between the stored widths; outside them the renormalised weights may not be better."""
    snapshots = [(k * 50, gamma(r)) for k in range(1, n + 1) for r in (0.05, 0.10)]
    t, g = n * 50, gamma(s)
    weights = solve(snapshots, t, g)
    assert math.isclose(weights.sum(), 1.0, rel_tol=1e-9)
    nearest = min(residual(snapshots, np.eye(len(snapshots))[i], t, g) for i in (-2, -1))
    assert residual(snapshots, weights, t, g) <= nearest * (1 + 1e-9) + 1e-12
