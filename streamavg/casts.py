"""Exact conversions between stored floats and the fold's float64, fast where the library
casts are slow: bfloat16 is the top half of a float32, so widening is a 16-bit shift and
narrowing a few integer operations on float32 bits (ml_dtypes takes seven times longer);
float16 widens by the same shifts and one exact product (numpy's cast is scalar code).

>>> import ml_dtypes
>>> x = np.array([1 + 2**-8 + 2**-30, -3.5, 2**-130], np.float64)  # a near-tie, a subnormal
>>> out = np.empty(3, np.uint16)
>>> narrow(x, out, "bfloat16", np.empty(3, np.float32), np.empty(3, np.uint32))
>>> bool((out == x.astype(ml_dtypes.bfloat16).view(np.uint16)).all())
True
"""

from __future__ import annotations

import functools

import numpy as np

BFLOAT16 = "bfloat16"
HALF = "float16"
_HALF_EXPONENT = 0x7C00
_HALF = 0x8000  # a float32's low 16 bits at a bfloat16 midpoint


@functools.cache
def named_dtype(name: str) -> np.dtype:
    """numpy's dtype of that name, else ml_dtypes' (bfloat16, float8_*), which is imported
    only then: it takes most of a second, which no run of numpy's own types pays."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def typed(x: np.ndarray, logical: str) -> np.ndarray:
    """`x` as values of dtype `logical`: raw storage (bytes of an ml_dtypes type) viewed so."""
    return x if x.dtype.name == logical else x.view(named_dtype(logical))


def widen(x: np.ndarray, logical: str, scratch: np.ndarray) -> np.ndarray:
    """`x`, stored data of dtype `logical`, as values the fold's float64 arithmetic takes
    exactly: bfloat16 and float16 widened into float32 `scratch` by integer operations,
    without ml_dtypes or numpy's scalar half casts; the others as they are (numpy and
    ml_dtypes widen them inside the arithmetic)."""
    if logical not in (BFLOAT16, HALF):
        return typed(x, logical)
    wide = scratch[: x.size].reshape(x.shape)
    bits = wide.view(np.uint32)
    np.copyto(bits, x.view(np.uint16))
    np.left_shift(bits, 16, out=bits)  # a bfloat16's bits are a float32's top half
    if logical == HALF:
        _half_from_top(x, wide)
    return wide


def _half_from_top(x: np.ndarray, wide: np.ndarray) -> None:
    """float16 `x`, whose bits are the top half of `wide`, as float32 in `wide`: its 5
    exponent and 10 mantissa bits shifted into a float32's places give 2**-112 times its
    value, subnormals included, which one exact product puts right. Infinities and NaN
    (an all-ones exponent) take numpy's cast instead."""
    if np.bitwise_and(x.view(np.uint16), _HALF_EXPONENT).max() == _HALF_EXPONENT:
        np.copyto(wide, x.view(np.float16))
        return
    bits = wide.view(np.uint32)
    np.right_shift(bits.view(np.int32), 3, out=bits.view(np.int32))  # sign copied thrice
    np.bitwise_and(bits, 0x8FFFFFFF, out=bits)  # the copies dropped
    np.multiply(wide, np.float32(2.0**112), out=wide)


def narrow(
    acc: np.ndarray,
    out: np.ndarray,
    logical: str,
    single: np.ndarray,
    bits: np.ndarray,
    *,
    nan: bool = False,
) -> None:
    """Round float64 `acc` once, to nearest with ties to even, into `out` (stored data of
    dtype `logical`, of `acc`'s size). bfloat16 goes through float32 `single` and uint32
    `bits` scratch, a piece of their size at a time; `nan` says `acc` may hold NaN."""
    if logical != BFLOAT16:
        np.copyto(typed(out.reshape(-1), logical), acc.reshape(-1), casting="unsafe")
        return
    flat, raw, step = acc.reshape(-1), out.reshape(-1).view(np.uint16), single.size
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        f, b = single[: part.size], bits[: part.size]
        np.copyto(f, part, casting="unsafe")  # to nearest float32: a bfloat16 tie only if exact
        _off_ties(f, part, b)
        i = f.view(np.uint32)
        np.right_shift(i, 16, out=b)  # to nearest bfloat16, ties to even, on the bits
        np.bitwise_and(b, 1, out=b)
        np.add(b, 0x7FFF, out=b)
        np.add(b, i, out=b)
        np.right_shift(b, 16, out=b)
        if nan:  # a NaN's payload must not carry it into the infinities: quiet NaN
            where = np.isnan(part)
            b[where] = (i[where] >> 16) | 0x40
        np.copyto(raw[start : start + part.size], b, casting="unsafe")


def _off_ties(f: np.ndarray, exact: np.ndarray, scratch: np.ndarray) -> None:
    """Where rounding float64 `exact` to float32 `f` landed on a bfloat16 midpoint that
    `exact` is not on, move `f` one float32 ulp towards `exact`: the second rounding then
    goes the way the value lies (round to odd), never the way of the tie (rare)."""
    i = f.view(np.uint32)
    np.bitwise_and(i, 0xFFFF, out=scratch)
    candidates = np.flatnonzero(scratch == _HALF)
    if not candidates.size:
        return
    wide, want = f[candidates].astype(np.float64), exact[candidates]
    moved = candidates[(wide != want) & ~np.isnan(want)]
    up = np.abs(exact[moved]) > np.abs(f[moved].astype(np.float64))
    i[moved] = np.where(up, i[moved] + 1, i[moved] - 1)
