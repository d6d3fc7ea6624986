"""The Python API: plan an average (files and weights), then run it into a file or memory.

>>> import streamavg
>>> result = streamavg.average(["ckpts/"], scheme="linear", last=10)  # doctest: +SKIP
>>> result.output, result.weights[-1]  # doctest: +SKIP
(PosixPath('ckpts/averaged/model_499.avg-linear-n10.keras'), 0.1818...)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import keras_zip
from ._version import __version__
from .engine import MIN_MEMORY, fold, model_tensors, open_all
from .errors import UsageError, option
from .formats import SUFFIXES, Checkpoint
from .output import atomic_output, check_output, destination, h5_like
from .schemes import scheme_weights
from .select import select_checkpoints

OPTIMIZER_POLICIES = ("drop", "newest")


class Plan(NamedTuple):
    """What to average: checkpoints oldest first, their normalised weights, and how."""

    files: tuple[Path, ...]
    weights: tuple[float, ...]
    scheme: str
    alpha: float | None = None
    by_mtime: bool = False


class Result(NamedTuple):
    """What was written (None when averaged in memory or loaded into a model), from what."""

    output: Path | None
    files: tuple[Path, ...]
    weights: tuple[float, ...]


def plan(
    paths: Iterable[str | os.PathLike],
    *,
    scheme: str = "equal",
    alpha: float = 2.0,
    weights: Sequence[float] | None = None,
    pattern: str | None = None,
    last: int | None = None,
    epochs: str | None = None,
) -> Plan:
    """Select and order checkpoints, then weigh them; reads no file contents."""
    scheme_weights(scheme, 1, alpha=alpha)  # reject a bad scheme or alpha before touching files
    sel = select_checkpoints(paths, pattern=pattern, last=last, epochs=epochs)
    w = scheme_weights(scheme, len(sel.paths), alpha=alpha, weights=weights)
    name = "weights" if weights is not None else scheme
    return Plan(sel.paths, tuple(w.tolist()), name, alpha if name == "exp" else None, sel.by_mtime)


def run(
    p: Plan,
    output: str | os.PathLike | None = None,
    *,
    optimizer: str = "drop",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    max_memory: int | None = None,
    progress: bool = False,
) -> Result:
    """Average the plan's checkpoints into `output`, a file in their own format.

    `max_memory` caps the working buffers in bytes (default: a few MiB per core, which
    is fastest); memory never grows with the model's size or the number of checkpoints.
    """
    if optimizer not in OPTIMIZER_POLICIES:
        raise UsageError(f"{option('optimizer')} must be one of {', '.join(OPTIMIZER_POLICIES)}")
    if max_memory is not None and max_memory < MIN_MEMORY:
        raise UsageError(f"{option('max_memory')} must be at least {MIN_MEMORY >> 20}M")
    with ExitStack() as stack:
        checkpoints = open_all(p.files, stack)
        newest = checkpoints[-1]
        dest = destination(output, newest, p.scheme, len(p.files))
        check_output(dest, p.files, overwrite)
        averaged = [t for t in model_tensors(newest).values() if t.averaged]
        provenance = {
            "streamavg": __version__,
            "scheme": p.scheme,
            **({"alpha": p.alpha} if p.alpha is not None else {}),
            "optimizer": optimizer,
            "files": [f.name for f in p.files],
            "weights": list(p.weights),
        }
        need = sum(t.nbytes for t in averaged)
        tmp = stack.enter_context(atomic_output(dest, overwrite, need=need))
        zipped = newest.format == "keras"
        checksums: dict[int, tuple[int, int]] = {}
        with h5_like(
            newest,
            tmp,
            [t.name for t in averaged],
            optimizer=optimizer == "newest",
            provenance=provenance,
            userblock=keras_zip.HEADER if zipped else 0,
            checksums=checksums if zipped else None,
        ) as write:
            fold(
                checkpoints,
                np.array(p.weights),
                averaged,
                lambda t, index, values: write(t.name, values, index),
                max_memory=max_memory,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
            )
        if zipped:
            keras_zip.finish(newest.path, tmp, checksums)
    return Result(dest, p.files, p.weights)


def average(
    paths: Iterable[str | os.PathLike],
    *,
    scheme: str = "equal",
    alpha: float = 2.0,
    weights: Sequence[float] | None = None,
    output: str | os.PathLike | None = None,
    pattern: str | None = None,
    last: int | None = None,
    epochs: str | None = None,
    **options: Any,
) -> Result:
    """Average Keras checkpoints into one file of their format; see :func:`run` for `options`.

    >>> streamavg.average(["ckpts/"], scheme="exp", alpha=2.0, output="avg.keras")  # doctest: +SKIP
    """
    p = plan(
        paths,
        scheme=scheme,
        alpha=alpha,
        weights=weights,
        pattern=pattern,
        last=last,
        epochs=epochs,
    )
    return run(p, output, **options)


def average_tensors(
    paths: Iterable[str | os.PathLike], *, allow_nonfinite: bool = False, **plan_args: Any
) -> dict[str, np.ndarray]:
    """The averaged model tensors in memory, by their names in the file (for small models).

    Non-float tensors come from the newest checkpoint; optimizer state is left out.
    """
    p = plan(paths, **plan_args)
    with ExitStack() as stack:
        checkpoints = open_all(p.files, stack)
        tensors = model_tensors(checkpoints[-1])
        newest = checkpoints[-1]
        result = {n: newest.read_whole(n) for n, t in tensors.items() if not t.averaged}
        averaged = [t for t in tensors.values() if t.averaged]
        result |= {t.name: np.empty(t.shape, t.dtype) for t in averaged}

        def write(t, index, values):
            result[t.name][index] = values

        fold(checkpoints, np.array(p.weights), averaged, write, allow_nonfinite=allow_nonfinite)
    return {n: result[n] for n in tensors}


def load_into_model(
    model: Any,
    paths: Iterable[str | os.PathLike],
    *,
    allow_nonfinite: bool = False,
    **plan_args: Any,
) -> Result:
    """Average `paths` (selected and weighed as by :func:`plan`) into a Keras `model`.

    The average goes to a temporary file that `model.load_weights` reads, so Keras maps the
    tensors onto the model exactly as it would the checkpoints themselves.
    """
    p = plan(paths, **plan_args)
    with Checkpoint(p.files[-1]) as newest, tempfile.TemporaryDirectory(prefix="streamavg-") as tmp:
        output = Path(tmp) / f"averaged{SUFFIXES[newest.format]}"
        run(p, output, allow_nonfinite=allow_nonfinite)
        model.load_weights(str(output))
    return Result(None, p.files, p.weights)
