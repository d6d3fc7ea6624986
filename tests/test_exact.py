"""Equal and linear averages are the correctly rounded mean (exact rational arithmetic,
rounded once, ties to even); exp and custom weights are within 1 ulp of the float64 one;
bfloat16 is rounded as ml_dtypes rounds a float64."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import correctly_rounded, ulp_distance
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import streamavg
from streamavg.casts import narrow, widen

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]


def neighbours(dtype: np.dtype, rng: np.random.Generator, size: int) -> np.ndarray:
    """Values of `dtype` and their next ones up: an equal pair's mean is a tie, exactly."""
    bits = np.dtype(f"u{dtype.itemsize}")
    base = rng.standard_normal(size).astype(dtype)
    return np.stack([base, (base.view(bits) + 1).view(dtype)])


def stack_of(dtype: np.dtype, n: int, seed: int) -> np.ndarray:
    """`n` checkpoints of one tensor: random values, pairs whose mean is a tie, values that
    cancel exactly, subnormals, and values far apart in magnitude."""
    rng = np.random.default_rng(seed)
    columns = [rng.standard_normal((n, 64)) * rng.choice([1e-3, 1, 30], (n, 64))]
    pair = neighbours(dtype, rng, 16).astype(np.float64)
    columns.append(np.concatenate([pair, pair[:1].repeat(n - 2, 0)]) if n > 2 else pair)
    signs = np.resize([1.0, -1.0], n)[:, None]  # +x, -x, ...: an equal sum of 0 for even n
    columns.append(signs * rng.standard_normal((1, 16)))
    tiny = np.finfo(dtype).smallest_subnormal if dtype != BF16 else 2.0**-133
    columns.append(rng.integers(-5, 6, (n, 8)) * float(tiny))
    return np.concatenate(columns, axis=1).astype(dtype)


def average(tmp_path: Path, stack: np.ndarray, scheme: str, **options) -> np.ndarray:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, values in enumerate(stack, 1):
        save_file({"w": np.ascontiguousarray(values)}, tmp_path / f"step_{i:03d}.safetensors")
    return streamavg.average_tensors([tmp_path], scheme=scheme, **options)["w"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("n", [2, 3, 10])
@pytest.mark.parametrize("scheme", ["equal", "linear"])
def test_equal_and_linear_are_the_correctly_rounded_mean(tmp_path, dtype, n, scheme):
    stack = stack_of(dtype, n, seed=n)
    got = average(tmp_path, stack, scheme)
    weights = [1] * n if scheme == "equal" else list(range(1, n + 1))
    want = correctly_rounded(stack, weights, dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    assert np.array_equal(got.view(bits), want.view(bits))
    if scheme == "equal" and n % 2 == 0:  # the cancelling values: +0 exactly, never ±1e-21
        assert not got[-24:-8].view(bits).any()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 12),
    dtype=st.sampled_from(DTYPES),
    scheme=st.sampled_from(["equal", "linear"]),
)
def test_any_stack_is_correctly_rounded(tmp_path_factory, seed, n, dtype, scheme):
    stack = stack_of(dtype, n, seed)
    got = average(tmp_path_factory.mktemp("exact"), stack, scheme)
    weights = [1] * n if scheme == "equal" else list(range(1, n + 1))
    assert ulp_distance(got, correctly_rounded(stack, weights, dtype)) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_exp_and_custom_weights_are_within_one_ulp(tmp_path, dtype):
    stack = stack_of(dtype, 5, seed=1)
    for options in ({"scheme": "exp", "alpha": 1.5}, {"weights": [0.1, 2, 0.3, 4, 0.7]}):
        w = streamavg.scheme_weights(options.pop("scheme", "equal"), 5, **options)
        got = average(tmp_path / str(len(options)), stack, "exp", **options)
        want = np.average(stack.astype(np.float64), axis=0, weights=w).astype(dtype)
        assert ulp_distance(got, want) <= 1


def test_bfloat16_rounds_as_ml_dtypes_rounds_a_float64():
    """Ties either way, values a hair off a tie (which a float32 step would make a tie),
    subnormals, the largest finite values, infinities and NaN."""
    one = 1 + 2.0**-8  # the midpoint between 1 and the next bfloat16
    values = [one, -one, 1 + 3 * 2.0**-8, one + 2.0**-40, one - 2.0**-40, -(one + 2.0**-40)]
    values += [2.0**-133, 3 * 2.0**-134, 2.0**-140, -(2.0**-127) * 1.00390625, 0.0, -0.0]
    values += [3.3895313892515355e38, 3.3961e38, 1e39, np.inf, -np.inf, np.nan, -np.nan]
    rng = np.random.default_rng(0)
    values += list(rng.standard_normal(1000) * 10.0 ** rng.integers(-40, 38, 1000))
    x = np.array(values)
    out = np.empty(x.size, np.uint16)
    narrow(x, out, BF16, np.empty(7, np.float32), np.empty(7, np.uint32), nan=True)
    want = x.astype(BF16).view(np.uint16)
    assert np.array_equal(out, want), [
        (v, hex(a), hex(b)) for v, a, b in zip(x, out, want, strict=True) if a != b
    ]


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: d.name)
def test_nonfinite_16_bit_inputs_average_as_the_library_casts_round(tmp_path, dtype):
    stack = np.array([[np.inf, np.nan, 1.0, -np.inf], [1.0, 2.0, np.inf, -np.inf]]).astype(dtype)
    got = average(tmp_path, stack, "equal", allow_nonfinite=True)
    want = np.mean(stack.astype(np.float64), axis=0).astype(dtype)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=lambda d: d.name)
def test_every_16_bit_pattern_widens_to_its_value(dtype):
    every = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    for x in (every, every[np.isfinite(every)]):  # float16 with Inf or NaN: numpy's cast
        got = widen(x, dtype.name, np.empty(x.size, np.float32)).astype(np.float64)
        want = x.astype(np.float64)
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))
