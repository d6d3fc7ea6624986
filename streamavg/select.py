"""Find checkpoints and put them in chronological order.

Order comes from the epoch or step number in the file name, naturally sorted
(`model_9` before `model_10`); names without a number fall back to modification time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from .errors import StreamavgError, UsageError, option

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
_NUMBER = re.compile(r"(\d+)")


class Selection(NamedTuple):
    """Checkpoints oldest first; `by_mtime` says the names carried no order."""

    paths: tuple[Path, ...]
    by_mtime: bool = False


def stem(name: str) -> str:
    """The name without its checkpoint suffix, whose "5" in ".h5" is no epoch."""
    for suffix in (".weights.h5", *CHECKPOINT_SUFFIXES):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def natural_key(name: str) -> list:
    """Sort key treating digit runs as numbers: `model_9` < `model_10`."""
    return [int(tok) if i % 2 else tok for i, tok in enumerate(_NUMBER.split(stem(name)))]


def epoch_numbers(names: Sequence[str]) -> list[int]:
    """The epoch of each name: the first number that differs across the names.

    >>> epoch_numbers(["weights.09-0.31.h5", "weights.10-0.30.h5"])
    [9, 10]
    """
    numbers = [[int(n) for n in _NUMBER.findall(stem(name))] for name in names]
    width = min(len(ns) for ns in numbers)
    column = next((j for j in range(width) if len({ns[j] for ns in numbers}) > 1), width - 1)
    return [ns[column] for ns in numbers]


def parse_epochs(spec: str) -> tuple[int | None, int | None]:
    """`"490:499"` -> (490, 499), inclusive; either side may be left open."""
    lo, sep, hi = spec.partition(":")
    try:
        bounds = (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        bounds = None
    if not sep or bounds is None or (None not in bounds and bounds[0] > bounds[1]):
        raise UsageError(f"{option('epochs')} wants FIRST:LAST, such as 490:499; got {spec!r}")
    return bounds


def _scan(directory: Path, pattern: str | None) -> list[Path]:
    found = sorted(p for p in directory.glob(pattern or "*") if p.is_file())
    if pattern is None:
        found = [p for p in found if p.name.endswith(CHECKPOINT_SUFFIXES)]
    if not found:
        what = f"matches {pattern!r}" if pattern else "(*.keras, *.h5 or *.hdf5)"
        raise StreamavgError(f"{directory}: no checkpoint {what}")
    return found


def select_checkpoints(
    inputs: Iterable[str | Path],
    *,
    pattern: str | None = None,
    last: int | None = None,
    epochs: str | None = None,
) -> Selection:
    """Directories (scanned with `pattern`) and files, ordered oldest first, then filtered."""
    if last is not None and last < 1:
        raise UsageError(f"{option('last')} must be at least 1, got {last}")
    bounds = parse_epochs(epochs) if epochs is not None else None
    paths: dict[Path, Path] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            found = _scan(item, pattern)
        elif item.exists():
            found = [item]
        else:
            raise StreamavgError(f"{item}: no such file or directory")
        paths.update((p.resolve(), p) for p in found)
    if not paths:
        raise UsageError("no checkpoints given")
    chosen = list(paths.values())
    by_mtime = not all(_NUMBER.search(stem(p.name)) for p in chosen)
    if by_mtime:
        chosen.sort(key=lambda p: (p.stat().st_mtime_ns, natural_key(p.name)))
    else:
        chosen.sort(key=lambda p: (natural_key(p.name), str(p)))
    if bounds is not None:
        chosen = _in_epochs(chosen, bounds, epochs)
    return Selection(tuple(chosen[-last:] if last else chosen), by_mtime)


def _in_epochs(chosen: list[Path], bounds: tuple[int | None, int | None], spec: str) -> list[Path]:
    if not all(_NUMBER.search(stem(p.name)) for p in chosen):
        raise UsageError(f"{option('epochs')} needs an epoch number in every file name")
    lo, hi = bounds
    numbers = epoch_numbers([p.name for p in chosen])
    kept = [
        p
        for p, e in zip(chosen, numbers, strict=True)
        if (lo is None or e >= lo) and (hi is None or e <= hi)
    ]
    if not kept:
        raise StreamavgError(
            f"{chosen[0].parent}: no checkpoint in epochs {spec} "
            f"(found {min(numbers)}..{max(numbers)})"
        )
    return kept
