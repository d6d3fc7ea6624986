"""How many checkpoints to average, and which: scored in one pass over the files, newest first.

`sweep` scores the average of the last n checkpoints for every n at once. Reading the
files newest first, the scheme's weights of the files already read do not change when an
older one joins (equal, exp), or change in a way two running sums absorb (linear):

    linear, last n:  sum_i (n + 1 - i) y_i = (n + 1) * sum_i y_i - sum_i i * y_i

`greedy_soup` is Wortsman et al.'s greedy soup (2022): rank the checkpoints by score, start
from the best, and keep each next one only if the equal average does not score worse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .companions import check_companions
from .engine import model_tensors, open_all, to_average
from .formats import Reader, Tensor
from .schemes import scheme_weights
from .select import select_checkpoints

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's from Python 3.11

    from .select import Choosing

Tensors = dict[str, np.ndarray]
Evaluate = Callable[[Tensors], float]


class Sweep(NamedTuple):
    """Scores of the average of the last n checkpoints, for n = 1..len(files)."""

    files: tuple[Path, ...]  # oldest first
    scores: dict[int, float]
    best: int


class Soup(NamedTuple):
    """A greedy soup: each candidate's own score, and the checkpoints kept, best first."""

    singles: dict[Path, float]
    kept: tuple[Path, ...]
    score: float


class LastN:
    """Running sums over checkpoints given newest first; `add` returns the last-n average.

    >>> last = LastN("linear")
    >>> [last.add({"w": np.array([x])})["w"].item() for x in (3.0, 0.0)]
    [3.0, 2.0]
    """

    def __init__(self, scheme: str, alpha: float = 2.0) -> None:
        scheme_weights(scheme, 1, alpha=alpha)  # reject a bad scheme or alpha now
        self.scheme, self.alpha, self.n = scheme, alpha, 0
        self.total = 0.0
        self.sums: Tensors = {}  # sum of c_i y_i (equal, exp), or of y_i (linear)
        self.ranked: Tensors = {}  # linear only: sum of i * y_i

    def add(self, tensors: Tensors) -> Tensors:
        """Fold in the next older checkpoint's float64 tensors; return the float64 average."""
        self.n = n = self.n + 1
        if self.scheme == "linear":
            for k, y in tensors.items():
                self.sums[k] = self.sums.get(k, 0) + y
                self.ranked[k] = self.ranked.get(k, 0) + n * y
            scale = n * (n + 1) / 2
            return {k: ((n + 1) * s - self.ranked[k]) / scale for k, s in self.sums.items()}
        w = scheme_weights(self.scheme, n, alpha=self.alpha)
        c = w[0] / w[-1]  # the oldest file's weight relative to the newest's
        self.total += c
        for k, y in tensors.items():
            self.sums[k] = self.sums.get(k, 0) + c * y
        return {k: s / self.total for k, s in self.sums.items()}


def sweep(
    paths: Iterable[str | os.PathLike],
    scheme: str = "equal",
    *,
    evaluate: Evaluate,
    alpha: float = 2.0,
    maximize: bool = True,
    integers: str = "equal",
    **select: Unpack[Choosing],
) -> Sweep:
    """Score the average of the last n checkpoints for every n, reading each file once.

    `evaluate` gets the averaged model tensors by their names in the newest file, in their
    stored dtypes (as `average_tensors` returns them), and returns a score; `maximize` says
    whether higher is better. `integers` is as for `run`, over all the files. `select`
    takes the keyword arguments of `select_checkpoints`.
    """
    last = LastN(scheme, alpha)
    files = select_checkpoints(paths, **select).paths
    scores = {}
    with ExitStack() as stack:
        checkpoints = open_all(files, stack)
        check_companions(checkpoints)  # the same model in every checkpoint
        newest, averaged = checkpoints[-1], to_average(checkpoints, integers=integers)
        for n, ck in enumerate(reversed(checkpoints), 1):
            scores[n] = evaluate(_stored(newest, last.add(_read(ck, averaged))))
    best = (max if maximize else min)(scores, key=lambda n: (scores[n], -n))
    return Sweep(files, scores, best)


def greedy_soup(
    paths: Iterable[str | os.PathLike],
    *,
    evaluate: Evaluate,
    maximize: bool = True,
    integers: str = "equal",
    **select: Unpack[Choosing],
) -> Soup:
    """Wortsman et al.'s greedy soup over the selected checkpoints, in constant memory.

    Each file is scored alone (one pass), then read again in order of score: it joins the
    soup if the equal average with it scores no worse. The soup never scores worse than
    the best single checkpoint. `integers` is as for `run`, over all the files.
    """
    sign = 1 if maximize else -1
    files = select_checkpoints(paths, **select).paths
    with ExitStack() as stack:
        checkpoints = open_all(files, stack)
        check_companions(checkpoints)  # the same model in every checkpoint
        newest, averaged = checkpoints[-1], to_average(checkpoints, integers=integers)
        singles = {ck.path: evaluate(_stored(newest, _read(ck, averaged))) for ck in checkpoints}
        ranked = sorted(checkpoints, key=lambda ck: -sign * singles[ck.path])
        total = _read(ranked[0], averaged)
        kept, score = [ranked[0].path], singles[ranked[0].path]
        for ck in ranked[1:]:
            y = _read(ck, averaged)
            summed = {k: s + y[k] for k, s in total.items()}
            average = {k: s / (len(kept) + 1) for k, s in summed.items()}
            candidate = evaluate(_stored(newest, average))
            if sign * candidate >= sign * score:
                total, score = summed, candidate
                kept.append(ck.path)
    return Soup(singles, tuple(kept), score)


def _read(ck: Reader, averaged: list[Tensor]) -> Tensors:
    """The checkpoint's `averaged` tensors, whole, in float64."""
    return {t.name: ck.read_whole(t.name).astype(np.float64) for t in averaged}


def _stored(newest: Reader, average: Tensors) -> Tensors:
    """A full set of model tensors: `average` cast to the stored dtypes, the rest from `newest`."""
    return {
        n: average[n].astype(t.dtype) if n in average else newest.read_whole(n)
        for n, t in model_tensors(newest).items()
    }
