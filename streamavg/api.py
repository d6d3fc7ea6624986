"""The Python API: plan an average (files and weights), then run it into a file or memory.

>>> import streamavg
>>> result = streamavg.average(["ckpts/"], scheme="linear", last=10)  # doctest: +SKIP
>>> result.output, result.weights[-1]  # doctest: +SKIP
(PosixPath('ckpts/averaged/model_499.avg-linear-n10.keras'), 0.1818...)
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import multipart, remote
from ._version import __version__
from .choices import OPTIMIZER_POLICIES
from .cluster import Sending, fold_on
from .companions import check_companions
from .engine import MIN_MEMORY, fold, model_tensors, open_all, taken_whole, to_average
from .errors import UsageError, option
from .formats import SUFFIXES, format_of
from .names import below, common_dir
from .output import resolve
from .schemes import fold_weights, scheme_weights
from .select import select_checkpoints


class Plan(NamedTuple):
    """What to average: checkpoints oldest first, their normalised weights, and how.

    `notes` say what the selection left out, or how it ordered the files.
    """

    files: tuple[Path, ...]
    weights: tuple[float, ...]
    scheme: str
    alpha: float | None = None
    by_mtime: bool = False
    notes: tuple[str, ...] = ()
    format: str = ""  # the checkpoints' container, as the newest's adapter names it

    @property
    def folded(self) -> np.ndarray:
        """The weights the fold multiplies by (see `schemes.fold_weights`)."""
        return fold_weights(self.scheme, self.weights)


class Result(NamedTuple):
    """What was written (None when averaged in memory or loaded into a model), from what;
    `notes` say what was not averaged (layers taken whole from the newest checkpoint)."""

    output: Path | str | None  # a str for a URL
    files: tuple[Path, ...]
    weights: tuple[float, ...]
    notes: tuple[str, ...] = ()


def plan(
    paths: Iterable[str | os.PathLike],
    *,
    scheme: str = "equal",
    alpha: float = 2.0,
    weights: Sequence[float] | None = None,
    pattern: str | None = None,
    last: int | None = None,
    epochs: str | None = None,
    template: str | None = None,
    best: int | None = None,
    monitor: str | None = None,
    mode: str = "auto",
    log: str | os.PathLike | None = None,
) -> Plan:
    """Select and order checkpoints (see :func:`streamavg.select.select_checkpoints`), then
    weigh them. Reads no weights: only the files' provenance, the newest's metadata (its
    format), and the `log` if given.

    >>> streamavg.plan(["ckpts/"], best=5, monitor="val_loss", log="log.csv")  # doctest: +SKIP
    """
    scheme_weights(scheme, 1, alpha=alpha)  # reject a bad scheme or alpha before touching files
    sel = select_checkpoints(
        paths,
        pattern=pattern,
        last=last,
        epochs=epochs,
        template=template,
        best=best,
        monitor=monitor,
        mode=mode,
        log=log,
    )
    w = scheme_weights(scheme, len(sel.paths), alpha=alpha, weights=weights)
    name = "weights" if weights is not None else scheme
    decay = alpha if name == "exp" else None
    fmt = format_of(sel.paths[-1])
    return Plan(sel.paths, tuple(w.tolist()), name, decay, sel.by_mtime, sel.notes, fmt)


def check_options(*, optimizer: str = "drop", max_memory: int | None = None) -> None:
    """Refuse option values that `run` cannot take, before any work (a dry run too)."""
    if optimizer not in OPTIMIZER_POLICIES:
        raise UsageError(f"{option('optimizer')} must be one of {', '.join(OPTIMIZER_POLICIES)}")
    if max_memory is not None and max_memory < MIN_MEMORY:
        raise UsageError(f"{option('max_memory')} must be at least {MIN_MEMORY >> 20}M")


def run(
    p: Plan,
    output: str | os.PathLike | None = None,
    *,
    optimizer: str = "drop",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    integers: str = "equal",
    companions: str = "equal",
    max_memory: int | None = None,
    progress: bool = False,
    client: Any = None,
) -> Result:
    """Average the plan's checkpoints into `output`, a file or folder in their own format.

    Integer weights (counters, quantized kernels) cannot be averaged: with `integers`
    "equal" they must be the same in every checkpoint; with "newest", a layer whose
    integers differ is taken whole from the newest checkpoint, its float weights too (a
    quantized kernel's scale), so that no layer is half averaged.
    The files that give the weights their meaning (model config, vocabulary, tokenizer)
    must be the same in every checkpoint; with `companions` "newest" the newest's are
    taken, with a note (see :mod:`streamavg.companions`).
    `max_memory` caps the working buffers in bytes (default: a few MiB per core, which
    is fastest); memory never grows with the model's size or the number of checkpoints.
    With a Dask `client`, the fold runs on its cluster (see `streamavg.cluster`), into the
    same bytes. A URL `output` (`s3://...`; by default, beside inputs in a store) is
    written locally, then uploaded (see :mod:`streamavg.remote`).
    """
    check_options(optimizer=optimizer, max_memory=max_memory)
    with ExitStack() as stack:
        url = resolve(output, p.format, p.files, p.scheme, overwrite=overwrite)
        sending = spread = None
        if isinstance(url, str):  # written here, then uploaded (see streamavg.remote)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="streamavg-"))
            dest = Path(tmp) / url.rsplit("/", 1)[-1]
            if client is not None and multipart.supported(url):  # the workers upload it
                sending = stack.enter_context(Sending(dest, url))
        else:
            dest = url
        checkpoints = open_all(p.files, stack)
        newest = checkpoints[-1]
        notes = _meaning(checkpoints, companions)
        averaged = to_average(checkpoints, integers=integers, max_memory=max_memory)
        whole = taken_whole(newest, averaged)
        why = f"integers differ, so taken whole from {newest.path}"
        notes += (f"{', '.join(whole)}: {why}",) if whole else ()
        provenance = {
            "streamavg": __version__,
            "scheme": p.scheme,
            **({"alpha": p.alpha} if p.alpha is not None else {}),
            "optimizer": optimizer,
            "integers": integers,
            "files": _relative(p.files),
            "weights": list(p.weights),
        }
        with newest.write_like(
            dest,
            [t.name for t in averaged],
            optimizer=optimizer == "newest",
            provenance=provenance,
            overwrite=overwrite,
        ) as write:
            if client is not None:
                folding = {"allow_nonfinite": allow_nonfinite, "progress": progress}
                spread = fold_on(
                    client, p.files, p.folded, averaged, write.targets, sending=sending, **folding
                )
            else:
                fold(
                    checkpoints,
                    p.folded,
                    averaged,
                    lambda t, index, values: write(t.name, values, index),
                    max_memory=max_memory,
                    allow_nonfinite=allow_nonfinite,
                    progress=progress,
                )
        if sending is not None:
            assert spread is not None  # `sending` comes with a `client`, which folded
            sending.finish(client, spread, progress)
        elif isinstance(url, str):
            remote.upload(dest, url)
    return Result(url, p.files, p.weights, notes)


LORA = re.compile(r"(^|[./])lora_[AB]([./]|$)")  # PEFT's names for the factors


def _meaning(checkpoints: Sequence, policy: str) -> tuple[str, ...]:
    """Notes on what gives the weights their meaning: companions that differ (refused
    unless `policy` is "newest"), and LoRA factors, whose average is not that of updates."""
    notes = check_companions(checkpoints, policy)
    if len(checkpoints) > 1 and any(LORA.search(n) for n in checkpoints[-1].tensors):
        notes.append(
            "LoRA adapters: A and B are averaged each on its own, and the product of the "
            "averages is not the average of the updates B·A (average merged weights for that)"
        )
    return tuple(notes)


def _relative(files: Sequence[Path]) -> list[str]:
    """The files below their common directory: names, or `epoch_3/model.keras` and such."""
    root = common_dir(files)
    return ["/".join(below(f, root)) for f in files]


def average(
    paths: Iterable[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    optimizer: str = "drop",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    integers: str = "equal",
    companions: str = "equal",
    max_memory: int | None = None,
    progress: bool = False,
    client: Any = None,
    **plan_args: Any,
) -> Result:
    """Average Keras checkpoints into one file of their format: :func:`plan` with
    `plan_args` (scheme, selection), then :func:`run` with the other options.

    >>> streamavg.average(["ckpts/"], scheme="exp", alpha=2.0, output="avg.keras")  # doctest: +SKIP
    """
    return run(
        plan(paths, **plan_args),
        output,
        optimizer=optimizer,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        integers=integers,
        companions=companions,
        max_memory=max_memory,
        progress=progress,
        client=client,
    )


def average_tensors(
    paths: Iterable[str | os.PathLike],
    *,
    allow_nonfinite: bool = False,
    integers: str = "equal",
    companions: str = "equal",
    **plan_args: Any,
) -> dict[str, np.ndarray]:
    """The averaged model tensors in memory, by their names in the newest file (for small
    models). What is not averaged (see `integers` in :func:`run`) comes from the newest
    checkpoint; optimizer state is left out.
    """
    return plan_tensors(
        plan(paths, **plan_args),
        allow_nonfinite=allow_nonfinite,
        integers=integers,
        companions=companions,
    )


def plan_tensors(
    p: Plan, *, allow_nonfinite: bool = False, integers: str = "equal", companions: str = "equal"
) -> dict[str, np.ndarray]:
    """:func:`average_tensors` for a plan made already."""
    with ExitStack() as stack:
        checkpoints = open_all(p.files, stack)
        _meaning(checkpoints, companions)
        tensors = model_tensors(checkpoints[-1])
        newest = checkpoints[-1]
        averaged = to_average(checkpoints, integers=integers)
        result = {n: newest.read_whole(n) for n in tensors.keys() - {t.name for t in averaged}}
        result |= {t.name: np.empty(t.shape, t.dtype) for t in averaged}

        def write(t, index, values):
            result[t.name][index] = values.view(t.dtype)

        fold(checkpoints, p.folded, averaged, write, allow_nonfinite=allow_nonfinite)
    return {n: result[n] for n in tensors}


def load_into_model(
    model: Any,
    paths: Iterable[str | os.PathLike],
    *,
    allow_nonfinite: bool = False,
    integers: str = "equal",
    **plan_args: Any,
) -> Result:
    """Average `paths` (selected and weighed as by :func:`plan`) into a Keras `model`;
    `integers` is as for :func:`run`.

    The average goes to a temporary file that `model.load_weights` reads, so Keras maps the
    tensors onto the model exactly as it would the checkpoints themselves. The model's
    optimizer state is left as it was: an average has none, so Keras's warning that it
    skipped the optimizer's variables says only that, and is not shown.
    """
    p = plan(paths, **plan_args)
    with tempfile.TemporaryDirectory(prefix="streamavg-") as tmp:
        output = Path(tmp) / f"averaged{SUFFIXES[p.format]}"
        run(p, output, allow_nonfinite=allow_nonfinite, integers=integers)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            model.load_weights(str(output))
    return Result(None, p.files, p.weights)
