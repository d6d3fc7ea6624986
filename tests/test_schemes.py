"""scheme_weights: exact values against float64 references, properties, and usage errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamavg.errors import UsageError
from streamavg.schemes import SCHEMES, scheme_weights

sizes = st.integers(min_value=1, max_value=200)
# Below 0.5 the oldest of 200 weights underflow to 0; above 1e6 neighbouring weights
# are no longer distinct in float64.
alphas = st.floats(min_value=0.5, max_value=1e6)


def usage_error(message: str, *args, **kwargs) -> None:
    """scheme_weights(*args, **kwargs) raises UsageError with exactly `message`."""
    with pytest.raises(UsageError) as e:
        scheme_weights(*args, **kwargs)
    assert str(e.value) == message
    assert e.value.exit_code == 2


# -- exact values -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 200])
def test_equal_is_one_over_n(n):
    assert np.array_equal(scheme_weights("equal", n), np.full(n, 1 / n))


def test_linear_four():
    assert scheme_weights("linear", 4).tolist() == [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 200])
def test_linear_matches_tutorial(n):
    """Same arithmetic as the tutorial (i/n, newest first, then reversed): bit-identical."""
    w = np.array([i / n for i in range(n, 0, -1)])[::-1]
    assert np.array_equal(scheme_weights("linear", n), w / w.sum())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.7, 1e3])
@pytest.mark.parametrize("n", [1, 2, 5, 200])
def test_exp_matches_numpy_formula(n, alpha):
    """The tutorial's exp(-i/alpha), normalised. streamavg computes exp(-(i-1)/alpha) so the
    newest weight is 1 and nothing underflows; the argument's rounding (up to 400 * 2**-53
    here) then moves the weights by far less than 1e-12 relative."""
    w = np.exp(-np.arange(n, 0, -1) / alpha)
    np.testing.assert_allclose(
        scheme_weights("exp", n, alpha=alpha), w / w.sum(), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.7, 1e3])
@pytest.mark.parametrize("n", [1, 2, 5, 200])
def test_exp_matches_libm_reference(n, alpha):
    """An independent math.exp / math.fsum reference, to 1e-12 relative (see above)."""
    w = [math.exp(-i / alpha) for i in range(n, 0, -1)]
    total = math.fsum(w)
    reference = np.array([x / total for x in w])
    np.testing.assert_allclose(scheme_weights("exp", n, alpha=alpha), reference, rtol=1e-12, atol=0)


def test_exp_default_alpha_is_two():
    assert np.array_equal(scheme_weights("exp", 6), scheme_weights("exp", 6, alpha=2.0))


def test_explicit_weights_override_scheme():
    for scheme in SCHEMES:
        assert scheme_weights(scheme, 3, weights=[1, 1, 2]).tolist() == [0.25, 0.25, 0.5]


# -- properties ---------------------------------------------------------------------------


def check_common(w: np.ndarray, n: int) -> None:
    assert w.dtype == np.float64
    assert w.shape == (n,)
    assert (w > 0).all()
    assert abs(math.fsum(w) - 1.0) < 1e-12


@given(n=sizes)
def test_equal_properties(n):
    w = scheme_weights("equal", n)
    check_common(w, n)
    assert (w == w[0]).all()


@given(n=sizes)
def test_linear_properties(n):
    w = scheme_weights("linear", n)
    check_common(w, n)
    assert (np.diff(w) > 0).all()  # strictly increasing, oldest to newest


@given(n=sizes, alpha=alphas)
def test_exp_properties(n, alpha):
    w = scheme_weights("exp", n, alpha=alpha)
    check_common(w, n)
    assert (np.diff(w) > 0).all()


@given(n=st.integers(min_value=2, max_value=200), alpha=alphas, factor=st.floats(1.5, 10.0))
def test_larger_alpha_is_flatter(n, alpha, factor):
    """The newest checkpoint's share shrinks as alpha grows."""
    newest = scheme_weights("exp", n, alpha=alpha)[-1]
    assert scheme_weights("exp", n, alpha=alpha * factor)[-1] < newest


@given(w=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=200))
def test_explicit_weights_normalise_exactly(w):
    raw = np.array(w, dtype=np.float64)
    if raw.sum() <= 0:
        usage_error("weights must have a positive, finite sum", "equal", len(w), weights=w)
        return
    got = scheme_weights("equal", len(w), weights=w)
    assert got.dtype == np.float64
    assert np.array_equal(got, raw / raw.sum())


def test_exp_tiny_alpha_gives_all_weight_to_newest():
    assert scheme_weights("exp", 3, alpha=0.001).tolist() == [0.0, 0.0, 1.0]


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_checkpoints(scheme):
    usage_error("no checkpoints to average", scheme, 0)


@pytest.mark.parametrize(
    ("alpha", "shown"), [(0, "0"), (0.0, "0.0"), (-1, "-1"), (math.nan, "nan"), (math.inf, "inf")]
)
def test_bad_alpha(alpha, shown):
    usage_error(f"alpha must be a positive number, got {shown}", "exp", 3, alpha=alpha)


def test_alpha_is_ignored_by_other_schemes():
    assert scheme_weights("linear", 2, alpha=0).tolist() == [1 / 3, 2 / 3]


def test_wrong_number_of_weights():
    usage_error("weights gives 2 weights for 3 checkpoints", "equal", 3, weights=[1, 2])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_weights_must_be_finite_and_non_negative(bad):
    usage_error("weights must be finite and non-negative", "equal", 3, weights=[1.0, bad, 1.0])


def test_weights_must_have_positive_sum():
    usage_error("weights must have a positive, finite sum", "equal", 3, weights=[0, 0, 0])


def test_unknown_scheme():
    usage_error("unknown scheme 'cosine'; choose from equal, linear, exp", "cosine", 3)
