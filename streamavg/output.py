"""Where results go: the default name beside the inputs, and what an output must not be."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

from . import remote
from .errors import UsageError, option
from .formats import ACCEPTED, FOLDERS, SUFFIXES, is_checkpoint_dir
from .names import below, common_dir, without_metrics
from .remote import as_path, is_url

OUTPUT_DIR = "averaged"  # default outputs go here, out of reach of a later scan of the inputs


def default_output(fmt: str, files: Sequence[Path], scheme: str) -> Path:
    """`<dir>/averaged/<newest>.avg-<scheme>-n<n><suffix>`, keeping the suffix its loader
    expects, for checkpoints of format `fmt` (the newest last).

    `<dir>` holds all the `files`, so checkpoints saved in folders by epoch
    (`ckpts/epoch_5/model.keras`) give `ckpts/averaged/epoch_5_model.avg-...`, never a file
    inside a checkpoint. A metric value in the newest's name (`model-0.53-05.keras`) is
    left out: it describes the newest checkpoint, not the average.
    """
    newest, root = files[-1], common_dir(files)
    names = below(newest, root)
    stem = "_".join(names).removesuffix(SUFFIXES[fmt])
    if fmt not in FOLDERS:
        stem = stem.removesuffix(newest.suffix)
    stem = without_metrics(stem) or stem
    suffix = SUFFIXES[fmt] if fmt != "legacy-h5" else newest.suffix
    if len(names) == 1:
        parent = newest.parent
    else:  # as the inputs were given: relative paths stay relative
        parent = root if newest.is_absolute() else Path(os.path.relpath(root))
    return parent / OUTPUT_DIR / f"{stem}.avg-{scheme}-n{len(files)}{suffix}"


def destination(
    output: str | os.PathLike | None,
    fmt: str,
    files: Sequence[Path],
    scheme: str,
    default: Path | None = None,
) -> Path:
    """Where an average of `files` (of format `fmt`, the newest last) goes: `output`, the
    default name inside `output` if that is a directory (or ends in "/"), or the default
    (`default`, else `default_output`).

    Refuses a name the inputs' loader would not read as their format.
    """
    default = default or default_output(fmt, files, scheme)
    if output is None:
        return default
    dest = as_path(output)
    folder = fmt in FOLDERS
    inside = dest.is_dir() and not dest.is_symlink() and not (folder and is_checkpoint_dir(dest))
    if str(output).endswith(("/", os.sep)) or inside:
        return dest / default.name
    if folder:
        if fmt == "keras-dir" and dest.name.endswith(".keras"):
            raise UsageError(
                f"{dest}: the inputs are {fmt} folders, which Keras does not read "
                "under a name ending in .keras"
            )
        return dest
    suffixes = ACCEPTED[fmt]
    legacy_as_weights = fmt.startswith("legacy") and dest.name.endswith(".weights.h5")
    if not dest.name.endswith(suffixes) or legacy_as_weights:
        keras = fmt.startswith(("keras", "legacy"))
        loader = "Keras reads" if keras else "their readers read"
        raise UsageError(
            f"{dest}: the inputs are {fmt} files, so {loader} the output only "
            f"under a name ending in {' or '.join(suffixes)}"
            + (" (not .weights.h5)" if fmt.startswith("legacy") else "")
        )
    return dest


def resolve(
    output: str | os.PathLike | None,
    fmt: str,
    files: Sequence[Path],
    scheme: str,
    *,
    overwrite: bool,
    default: Path | None = None,
) -> Path | str:
    """The output of an average (see `destination`), checked before any work: a path on
    disk (see `check_output`), or a URL (a `str`) that is no input, and that holds no
    object unless `overwrite`."""
    named = is_url(output) and not str(output).endswith("/")
    if named:  # the store first: one line if it cannot be reached or written
        remote.check_destination(str(output), overwrite)
    dest = destination(output, fmt, files, scheme, default)
    if not is_url(dest):
        check_output(dest, files, overwrite, folder=fmt in FOLDERS)
        return dest
    url = str(dest)
    if url in map(str, files):
        raise UsageError(f"{url}: output is one of the inputs")
    if not named:
        remote.check_destination(url, overwrite)
    return url


def check_output(
    dest: Path, inputs: Collection[Path], overwrite: bool, *, folder: bool = False
) -> None:
    """Refuse an output that is one of the inputs, that exists without `overwrite`, or that
    is not a regular file (a device, FIFO or socket is never replaced); if the output is a
    `folder` checkpoint, an existing one of those may be replaced, but no other folder."""
    for p in (p for p in inputs if not is_url(p)):  # a URL output is checked by api.run
        if dest.resolve() == p.resolve() or (dest.exists() and os.path.samefile(dest, p)):
            raise UsageError(f"{dest}: output is one of the inputs")
    if dest.is_symlink():
        raise UsageError(f"{dest}: is a symbolic link (name its target, or remove the link)")
    if dest.is_dir() and not (folder and is_checkpoint_dir(dest)):
        raise UsageError(f"{dest}: is a directory")
    if folder and dest.is_file():
        raise UsageError(f"{dest}: is a file, and the output is a folder")
    if dest.exists() and not dest.is_file() and not dest.is_dir():
        raise UsageError(f"{dest}: is not a regular file (a device, FIFO or socket)")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest}: already exists (pass {option('overwrite', True)} to replace it)")
