"""Where a piece of a tensor lies: contiguous blocks of a C-ordered array, pure arithmetic.

The fold works on blocks small enough for the CPU cache; each is one byte range in a
file and one HDF5 hyperslab, so it can be read with `os.preadv` or h5py alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


def blocks(shape: tuple[int, ...], elements: int) -> Iterator[tuple[slice, ...]]:
    """Cover a C-ordered tensor with contiguous blocks of at most `elements` elements.

    A block is a run along the first axis whose sub-arrays fit in `elements`, with every
    axis before it fixed to one index, so it is one byte range in the file and one HDF5
    hyperslab.

    >>> list(blocks((2, 3), 4))
    [(slice(0, 1, None),), (slice(1, 2, None),)]
    """
    if not shape:
        yield ()
        return
    axis = next(k for k in range(len(shape)) if math.prod(shape[k + 1 :]) <= elements)
    step = max(1, elements // max(1, math.prod(shape[axis + 1 :])))
    for lead in np.ndindex(*shape[:axis]):
        fixed = tuple(slice(i, i + 1) for i in lead)
        for start in range(0, shape[axis], step):
            yield (*fixed, slice(start, min(start + step, shape[axis])))


def block_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    """The shape of block `index` of a tensor of `shape`."""
    return (*(s.stop - s.start for s in index), *shape[len(index) :])


def flat_start(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    """Where block `index` starts in a C-ordered tensor of `shape`, in elements."""
    start = 0
    for k, n in enumerate(shape):
        start = start * n + (index[k].start if k < len(index) else 0)
    return start
