"""Post-hoc EMA synthesis (`streamavg phema`): the EMA of any length from `PostHocEMA`'s
snapshots, as a weighted sum that the streaming engine folds in constant memory.

>>> result = streamavg.phema("run/phema", 0.07, output="ema-0.07.weights.h5")  # doctest: +SKIP
>>> result.weights  # one per snapshot at or before the last step; some negative  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .api import Plan, Result, plan_tensors, run
from .errors import StreamavgError, UsageError, option
from .formats import PROVENANCE_KEY, open_checkpoint
from .output import destination
from .posthoc import SNAPSHOT_ATTR, check_sigma_rel, gamma, solve

DEFAULT_FOLDER = "phema-out"  # inside the snapshots' directory
FORMAT = "keras-weights"  # snapshots are .weights.h5 files, and so are their averages


class Snapshot(NamedTuple):
    """One `PostHocEMA` snapshot: a power-function EMA of width `sigma_rel` at `step`."""

    path: Path
    sigma_rel: float
    gamma: float
    step: int


def snapshots(directory: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in `directory`, by step, then sigma_rel. Files without the snapshot
    attribute are left out, and so are streamavg's outputs (which copy it)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise StreamavgError(f"{folder}: not a directory of PostHocEMA snapshots")
    found = []
    for path in sorted(folder.glob("*.weights.h5")):
        with open_checkpoint(path) as ck:  # refuses, in one line, a file it cannot read
            text = ck.attribute(SNAPSHOT_ATTR)
            if text is None or ck.attribute(PROVENANCE_KEY) is not None:
                continue
            try:
                meta = json.loads(text)
                found.append(Snapshot(path, meta["sigma_rel"], meta["gamma"], meta["step"]))
            except (ValueError, KeyError, TypeError):
                raise StreamavgError(f"{path}: {SNAPSHOT_ATTR} attribute is damaged") from None
    if not found:
        raise StreamavgError(f"{folder}: no PostHocEMA snapshots (*.weights.h5)")
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


class Recipe(NamedTuple):
    """How to make one EMA: the plan (snapshots and their solved weights), the step it is
    at, and the snapshots themselves (in the plan's order)."""

    plan: Plan
    step: int
    snapshots: tuple[Snapshot, ...]
    sigma_rel: float


def plan(directory: str | os.PathLike, sigma_rel: float, *, step: int | None = None) -> Recipe:
    """The snapshots at or before `step` (default: the last) and their solved weights for
    the EMA of width `sigma_rel` at that step (EDM2's least squares, summing to 1)."""
    target = gamma(sigma_rel)
    found = snapshots(directory)
    t = found[-1].step if step is None else step
    if t > found[-1].step:  # the weights after the last snapshot are unknown
        raise UsageError(f"{directory}: step {t} is after the last snapshot's ({found[-1].step})")
    chosen = tuple(s for s in found if s.step <= t)
    if not chosen:
        raise UsageError(
            f"{directory}: no snapshots at or before step {t} (the first is at {found[0].step})"
        )
    weights = solve([(s.step, s.gamma) for s in chosen], t, target)
    stored = sorted({s.sigma_rel for s in chosen})
    notes: tuple[str, ...] = ()
    if not stored[0] <= sigma_rel <= stored[-1]:
        notes = (
            f"sigma_rel {sigma_rel:g} is outside the stored {stored[0]:g}..{stored[-1]:g}: "
            "an extrapolation, less accurate",
        )
    files = tuple(s.path for s in chosen)
    p = Plan(files, tuple(weights.tolist()), f"phema-{sigma_rel:g}", notes=notes, format=FORMAT)
    return Recipe(p, t, chosen, sigma_rel)


def output_path(
    output: str | os.PathLike | None, directory: str | os.PathLike, recipe: Recipe
) -> Path:
    """`output`, or the default name inside it if it is a directory (or a URL ending in
    "/"); by default DIRECTORY/phema-out/ema-SIGMA-STEP.weights.h5."""
    name = f"ema-{recipe.sigma_rel:g}-{recipe.step:09d}.weights.h5"
    p = recipe.plan
    return destination(output, p.format, p.files, p.scheme, Path(directory) / DEFAULT_FOLDER / name)


def phema(
    directory: str | os.PathLike,
    sigma_rel: float,
    *,
    step: int | None = None,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Result:
    """Write the EMA of width `sigma_rel` at `step` (default: the last snapshot's), made
    from `PostHocEMA`'s snapshots in `directory`, as a `.weights.h5` that
    `model.load_weights` reads. See :func:`write`."""
    recipe = plan(directory, sigma_rel, step=step)
    return write(recipe, directory, output, overwrite=overwrite, progress=progress)


def write(
    recipe: Recipe,
    directory: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Result:
    """Fold the recipe's snapshots into `output` (see :func:`output_path`). Integer
    variables, which no EMA averages, come from the newest snapshot."""
    dest = output_path(output, directory, recipe)
    result = run(recipe.plan, dest, overwrite=overwrite, integers="newest", progress=progress)
    return result._replace(notes=recipe.plan.notes + result.notes)


def parse_sweep(text: str) -> list[float]:
    """'A:B:N' as N sigma_rels evenly spaced from A to B inclusive."""
    try:
        a, b, n = text.split(":")
        first, last, count = float(a), float(b), int(n)
    except ValueError:
        raise UsageError(f"{option('sweep')} takes FIRST:LAST:COUNT, e.g. 0.02:0.25:24") from None
    if count < 2 or not first < last:
        raise UsageError(f"{option('sweep')} needs FIRST < LAST and COUNT >= 2; got {text}")
    for s in (first, last):
        check_sigma_rel(s)
    return [first + (last - first) * i / (count - 1) for i in range(count)]


def sweep(
    directory: str | os.PathLike,
    sigma_rels: list[float],
    *,
    evaluate: Callable[[dict[str, np.ndarray]], float],
    step: int | None = None,
) -> dict[float, float]:
    """The score `evaluate` gives the EMA of each width in `sigma_rels` at `step`, each
    made in memory (one model at a time) from the snapshots."""
    return {
        s: evaluate(plan_tensors(plan(directory, s, step=step).plan, integers="newest"))
        for s in sigma_rels
    }
