"""Find checkpoints, put them in chronological order, and keep the ones asked for.

Order comes from the epoch (and batch) numbers in the names as ModelCheckpoint writes
them (see :mod:`streamavg.names`: metric values such as `0.53` are never epochs), read
from the path below the checkpoints' common directory (`epoch_12/model.keras`), or from
a ModelCheckpoint `template`. Names without any number fall back to modification time.

What is left out says so in `Selection.notes`: an earlier streamavg output beside the
original checkpoints (found in a directory, or named by a glob such as `ckpts/*`), a name
without a number beside numbered ones, a name the template does not match. What cannot
be ordered safely is refused: two files claiming one epoch, names of different kinds.

Filters apply in this order: `epochs` (a range), then `best` (the K best by `monitor`,
kept in chronological order), then `last` (the newest N).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple, TypedDict

from .errors import StreamavgError, UsageError, option
from .formats import (
    SHARD,
    averaged_by_streamavg,
    being_written,
    check_checkpoint,
    holds_weights,
    is_checkpoint_dir,
    parts,
    require_regular_file,
)
from .monitor import best_k, check_mode, direction, read_log
from .names import (
    CHECKPOINT_SUFFIXES,
    Name,
    Template,
    below,
    common_dir,
    compile_template,
    match_template,
    readings,
    stem,
)
from .output import OUTPUT_DIR
from .remote import OPENERS, absolute, as_path, errors, is_url

#: What a scan looks for, as messages name it.
KINDS = "(*.keras, *.h5, *.hdf5, *.weights.json, *.safetensors, or a checkpoint folder)"
MTIME_NOTE = "file names carry no epoch number; ordered by modification time"
_DIGITS = re.compile(r"(\d+)")


class Selection(NamedTuple):
    """Checkpoints oldest first, and what the choice rested on.

    `by_mtime` says the names carried no order; `notes` say what was left out or how
    the order was found; `values` are the monitored metric's, one per path, when the
    checkpoints were ranked with `best`.
    """

    paths: tuple[Path, ...]
    by_mtime: bool = False
    notes: tuple[str, ...] = ()
    values: tuple[float, ...] = ()


class Choosing(TypedDict, total=False):
    """The keyword arguments of :func:`select_checkpoints` that choose and order the files,
    for functions that pass them on (`sweep`, `greedy_soup`)."""

    pattern: str | None
    last: int | None
    epochs: str | None
    template: str | None
    best: int | None
    monitor: str | None
    mode: str
    log: str | os.PathLike | None


class _Entry(NamedTuple):
    path: Path
    key: tuple[int, ...]  # the order: the names' integers, or (epoch, batch)
    epoch: int | None
    fields: dict[str, float]  # a template's fields


def natural_key(name: str) -> list:
    """Sort key treating digit runs as numbers: `model_9` < `model_10`."""
    return [int(tok) if i % 2 else tok for i, tok in enumerate(_DIGITS.split(stem(name)))]


def _epoch_column(numbers: Sequence[tuple[int, ...]]) -> int:
    width = min(len(ns) for ns in numbers)
    return next((j for j in range(width) if len({ns[j] for ns in numbers}) > 1), width - 1)


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


def select_checkpoints(
    inputs: Iterable[str | os.PathLike],
    *,
    pattern: str | None = None,
    last: int | None = None,
    epochs: str | None = None,
    template: str | None = None,
    best: int | None = None,
    monitor: str | None = None,
    mode: str = "auto",
    log: str | os.PathLike | None = None,
) -> Selection:
    """Directories (scanned with `pattern`) and files, ordered oldest first, then filtered.

    `template` is a ModelCheckpoint filepath such as `ckpt.{epoch:02d}-{val_loss:.2f}.keras`;
    `best` keeps the K checkpoints best by `monitor` (`mode` auto, min or max), whose
    values come from `log` (a CSVLogger file) or else from the template's fields.
    """
    for name, value in (("last", last), ("best", best)):
        if value is not None and value < 1:
            raise UsageError(f"{option(name)} must be at least 1, got {value}")
    bounds = parse_epochs(epochs) if epochs is not None else None
    form = _template(template, epochs=epochs, log=log)
    _check_ranking(best, monitor, mode, log, form)
    notes: list[str] = []
    gathered = _gather(inputs, pattern, notes)
    found = _originals(gathered, notes)
    if form is not None:
        entries, by_mtime = _by_template(found, form, notes), False
    else:
        entries, by_mtime = _by_name(found, notes)
    if not by_mtime:
        _refuse_repeats(entries, form)
    if bounds is not None:
        entries = _in_epochs(entries, bounds, epochs)
    values: tuple[float, ...] = ()
    if best is not None:
        scores = _scores(entries, monitor, log, form)  # checks that the log has `monitor`
        kept = best_k(scores, best, direction(monitor, mode))
        entries, values = [entries[i] for i in kept], tuple(scores[i] for i in kept)
    if last:
        if len(entries) < last:
            notes.append(
                f"{option('last', last)}: only {count(len(entries), 'checkpoint')} to choose "
                "from, all taken"
            )
        entries, values = entries[-last:], values[-last:]
    if len(entries) == 1 and not gathered[entries[0].path]:  # not the one file named
        notes.append(f"only one checkpoint, {entries[0].path}: the average is a copy of it")
    return Selection(tuple(e.path for e in entries), by_mtime, tuple(notes), values)


def _template(template: str | None, **needs_epoch: object) -> Template | None:
    if template is None:
        return None
    try:
        form = compile_template(template)
    except ValueError as e:
        raise UsageError(f"{option('template', template)}: {e}") from None
    for name, value in needs_epoch.items():
        if value is not None and "epoch" not in form.fields:
            raise UsageError(f"{option(name)} needs an {{epoch}} field in {option('template')}")
    return form


def _check_ranking(
    best: int | None, monitor: str | None, mode: str, log: object, form: Template | None
) -> None:
    """Refuse ranking options that do not go together, before any file is read."""
    check_mode(mode)
    if best is None:
        given = {"monitor": monitor, "log": log, "mode": None if mode == "auto" else mode}
        for name, value in given.items():
            if value is not None:
                raise UsageError(f"{option(name)} needs {option('best')}")
        return None
    if monitor is None:
        raise UsageError(f"{option('best')} needs {option('monitor')}")
    if log is None and (form is None or monitor not in form.fields):
        raise UsageError(
            f"{option('monitor', monitor)}: no values to rank by; pass {option('log')} "
            f"(a CSVLogger file) or a {option('template')} with {{{monitor}}}"
        )


def _files(directory: Path, pattern: str | None, notes: list[str] | None = None) -> list[Path]:
    """The checkpoints in `directory`: files with a checkpoint's suffix (any file matching
    `pattern`, if given) and folders that are checkpoints, but no part of another (a shard
    its manifest lists, or one whose index is not written yet). With `notes`, folders and
    shards that look like checkpoints still being written are named there."""
    owned = parts(directory)
    found, partial = [], []
    for p in sorted(directory.glob(pattern or "*")):
        if p.is_dir():
            if is_checkpoint_dir(p):
                found.append(p)
            elif p.name != OUTPUT_DIR and (why := being_written(p)):
                partial.append(f"{p}: {why}")
        elif p.name in owned:
            continue
        elif SHARD.search(p.name):
            partial.append(f"{p}: a shard, but no index lists it: still being written?")
        elif pattern or p.name.endswith(CHECKPOINT_SUFFIXES):
            found.append(p)
    if notes is not None:
        notes.extend(f"left out {why}" for why in partial)
    return found


def _scan(directory: Path, pattern: str | None, notes: list[str]) -> list[Path]:
    """A directory's checkpoints; without any, those one level down (checkpoints saved as
    directories, `epoch_3/model.weights.h5`), unless a `pattern` says where to look.
    Checkpoints one level down beside ones at the top are not taken, but named in a note."""
    found = _files(directory, pattern, notes)
    if pattern is None:
        below = [
            p
            for sub in _subfolders(directory)
            if not is_checkpoint_dir(sub)
            for p in _files(sub, None)
        ]
        if not found:
            found = below + _files(directory / OUTPUT_DIR, None)
        elif below:
            folders = sorted({p.parent for p in below})
            notes.append(
                f"left out {count(len(below), 'checkpoint')} in {_listed(folders[:3])}"
                f"{', ...' if len(folders) > 3 else ''}: in folders below {directory}, "
                "beside the checkpoints in it (name the folders to take them instead)"
            )
    if not found:
        what = f"matches {pattern!r}" if pattern else KINDS
        raise StreamavgError(f"{directory}: no checkpoint {what}")
    return found


def _gather(
    inputs: Iterable[str | os.PathLike], pattern: str | None, notes: list[str]
) -> dict[Path, bool]:
    """Each path once (however many ways it was reached), and whether it was named.

    Hard links are separate checkpoints that happen to hold the same bytes (a backup tool
    links identical files): two at one epoch are refused later, like any two copies.
    """
    found: dict[Path, tuple[Path, bool]] = {}
    owners: dict[Path, dict[str, Path]] = {}
    for given in inputs:
        item = as_path(given)  # before Path() could fold a URL's "//"
        with errors(item) if is_url(item) else nullcontext():
            paths, named = _take(item, pattern, notes, owners)
        for p in paths:
            real = _resolved(p)
            first, was_named = found.get(real, (p, False))
            found[real] = (first, was_named or named)
    if not found:
        raise UsageError("no checkpoints given")
    if len({is_url(p) for p in found}) > 1:
        local, url = (next(p for p in found if is_url(p) == r) for r in (False, True))
        raise UsageError(f"{local} and {url}: average checkpoints from one place, local or remote")
    return dict(found.values())


def _take(
    item: Path, pattern: str | None, notes: list[str], owners: dict[Path, dict[str, Path]]
) -> tuple[list[Path], bool]:
    """The checkpoints that input `item` names, and whether it named one itself."""
    inner = [p for p in _subfolders(item) if is_checkpoint_dir(p)] if holds_weights(item) else []
    if inner:  # a Trainer's output_dir: its final model beside its checkpoint-N folders
        notes.append(
            f"{item}: averaging the checkpoint folders in it ({inner[0].name}, ...), not the "
            "model saved in the folder itself (name the folders to choose otherwise)"
        )
        found = _scan(item, pattern, notes)
        paths, named = [p for p in found if p.parent != item or p.is_dir()], False
    elif is_checkpoint_dir(item):
        paths, named = [item], True
    elif item.is_dir() and (why := being_written(item)):
        raise StreamavgError(f"{item}: {why}")
    elif item.is_dir():
        paths, named = _scan(item, pattern, notes), False
    elif item.exists():
        require_regular_file(item)  # a FIFO or device would block the first read
        if item.parent not in owners:  # once a folder, however many files it names
            owners[item.parent] = parts(item.parent)
        if item.name in owners[item.parent]:
            owner = owners[item.parent][item.name]
            raise StreamavgError(f"{item}: a part of checkpoint {owner}; name that instead")
        if not item.name.endswith(CHECKPOINT_SUFFIXES):  # named, so refused, not left out
            check_checkpoint(item)
        paths, named = [item], True
    else:
        raise StreamavgError(f"{item}: no such file or directory")
    return paths, named


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: Python's word for a loop, before 3.13
        raise StreamavgError(f"{path}: a symbolic link loop") from None


def _subfolders(path: Path) -> list[Path]:
    """The folders in `path` but streamavg's own output folder."""
    return [p for p in sorted(path.iterdir()) if p.is_dir() and p.name != OUTPUT_DIR]


def _originals(found: dict[Path, bool], notes: list[str]) -> list[Path]:
    """Leave out earlier streamavg outputs beside original checkpoints, found in a
    directory or named among them (as a shell glob such as `ckpts/*` names them), with a
    note. Outputs named without originals are averaged: that is an average of averages.
    Checkpoints in object storage are asked on several threads: each answer is a few
    round trips."""
    with ThreadPoolExecutor(OPENERS) as pool:
        ask = pool.map if any(map(is_url, found)) else map
        made = ask(averaged_by_streamavg, found)
        outputs = [p for p, output in zip(found, made, strict=True) if output]
    originals = [p for p in found if p not in outputs]
    named = [p for p in outputs if found[p]]
    if not originals and not named:
        raise StreamavgError(
            f"only earlier streamavg outputs found ({_listed(outputs)}); "
            "name them as files to average them"
        )
    left_out = outputs if originals else [p for p in outputs if not found[p]]
    if left_out:
        notes.append(f"left out {_listed(left_out)}: an earlier streamavg output")
    return originals or named


def _by_name(paths: list[Path], notes: list[str]) -> tuple[list[_Entry], bool]:
    """Entries ordered by the integers in their names; by mtime if no name has any."""
    names = _names(paths)
    numbered = [p for p in paths if names[p].numbers]
    if not numbered:
        paths = sorted(paths, key=lambda p: (p.stat().st_mtime_ns, natural_key(p.name)))
        if len(paths) > 1:
            notes.append(MTIME_NOTE)
        return [_Entry(p, (), None, {}) for p in paths], len(paths) > 1
    if len(numbered) < len(paths):
        unnumbered = [p for p in paths if not names[p].numbers]
        notes.append(
            f"left out {_listed(unnumbered)}: no epoch number in the name, "
            "unlike the other checkpoints"
        )
    kinds: dict[str, Path] = {}
    for p in sorted(numbered, key=str):
        kinds.setdefault(names[p].shape, p)
    if len(kinds) > 1:
        examples = _listed(list(kinds.values())[:2], " and ")
        raise StreamavgError(
            f"checkpoint names of different kinds, such as {examples}; "
            f"choose one kind with {option('pattern')} or {option('template')}"
        )
    numbered.sort(key=lambda p: (names[p].numbers, str(p)))
    column = _epoch_column([names[p].numbers for p in numbered])
    return [_Entry(p, names[p].numbers, names[p].numbers[column], {}) for p in numbered], False


def _names(paths: list[Path]) -> dict[Path, Name]:
    """The numbers of each path below the paths' common directory: those of its
    directories that carry numbers (`epoch_12/`), and of its name.

    A name that reads two ways (`weights.10.0.49`) takes the reading shaped like the
    names that read one way (`weights.03.0.53`, epoch 3); with none, it is refused.
    """
    root = common_dir(paths)
    options = {}
    for p in paths:
        *dirs, name = below(p, root)
        numbered = [d for d in dirs if any(r.numbers for r in readings(d))]
        options[p] = readings("/".join([*numbered, stem(name)]))
    clear = {rs[0].shape for rs in options.values() if len(rs) == 1 and rs[0].numbers}
    names = {}
    for p, rs in options.items():
        fits = [r for r in rs if r.shape in clear] if len(rs) > 1 else rs
        if len(fits) != 1:
            raise StreamavgError(
                f"{p}: cannot tell which of the numbers in its name is the epoch; "
                f"pass {option('template')} (the ModelCheckpoint filepath)"
            )
        names[p] = fits[0]
    return names


def _by_template(paths: list[Path], form: Template, notes: list[str]) -> list[_Entry]:
    """Entries ordered by the template's (epoch, batch); names it does not match left out."""
    fields = {p: match_template(form, absolute(p)) for p in paths}
    misses = [p for p in paths if fields[p] is None]
    if len(misses) == len(paths):
        raise StreamavgError(
            f"no checkpoint is named like {option('template', form.text)} (such as {paths[0]})"
        )
    if misses:
        notes.append(f"left out {_listed(misses)}: not named like {option('template', form.text)}")
    entries = [
        _Entry(p, (f.get("epoch", 0), f.get("batch", 0)), f.get("epoch"), f)
        for p, f in fields.items()
        if f is not None
    ]
    return sorted(entries, key=lambda e: (e.key, str(e.path)))


def _refuse_repeats(entries: list[_Entry], form: Template | None) -> None:
    """Two files at one point of training cannot both be right: refuse, naming both."""
    for a, b in pairwise(entries):
        if a.key == b.key:
            batch = f", batch {b.fields['batch']}" if form and "batch" in form.fields else ""
            raise StreamavgError(
                f"{a.path} and {b.path} are both epoch {b.epoch}{batch}; keep one of them"
            )


def _in_epochs(
    entries: list[_Entry], bounds: tuple[int | None, int | None], spec: str
) -> list[_Entry]:
    if any(e.epoch is None for e in entries):
        raise UsageError(f"{option('epochs')} needs an epoch number in every file name")
    lo, hi = bounds
    kept = [e for e in entries if (lo is None or e.epoch >= lo) and (hi is None or e.epoch <= hi)]
    if not kept:
        numbers = [e.epoch for e in entries]
        raise StreamavgError(
            f"{entries[0].path.parent}: no checkpoint in epochs {spec} "
            f"(found {min(numbers)}..{max(numbers)})"
        )
    return kept


def _scores(
    entries: list[_Entry], monitor: str, log: str | os.PathLike | None, form: Template | None
) -> list[float]:
    """`monitor`'s value for each entry: from the CSVLogger `log`, or the template's field."""
    if log is None:
        return [e.fields[monitor] for e in entries]
    if any(e.epoch is None for e in entries):
        raise UsageError(f"{option('log')} needs an epoch number in every file name")
    if form is not None and "batch" in form.fields:
        raise UsageError(
            f"{log} has one row per epoch, but the checkpoints were saved within epochs "
            f"({{batch}} in {option('template')}); rank them by a field of the template"
        )
    for a, b in pairwise(entries):
        if a.epoch == b.epoch:
            raise StreamavgError(
                f"{log} has one row per epoch, but {a.path} and {b.path} are both epoch {a.epoch}"
            )
    logged = read_log(log, monitor)
    for e in entries:
        if logged.get(e.epoch) is None:
            raise StreamavgError(
                f"{log}: no {monitor} for {e.path} (epoch {e.epoch}, which CSVLogger "
                f"writes as epoch {e.epoch - 1})"
            )
    return [logged[e.epoch] for e in entries]


def count(n: int, noun: str) -> str:
    """`1 file`, `2 files`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _listed(paths: Iterable[Path], sep: str = ", ") -> str:
    return sep.join(map(str, paths))
