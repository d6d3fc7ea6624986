"""Where results go: the default name beside the inputs, and what an output must not be."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path

from .errors import UsageError, option
from .formats import ACCEPTED, FOLDERS, SUFFIXES, Reader, is_checkpoint_dir
from .names import below, common_dir, without_metrics
from .remote import as_path, is_url

OUTPUT_DIR = "averaged"  # default outputs go here, out of reach of a later scan of the inputs


def default_output(newest: Reader, scheme: str, files: Sequence[Path]) -> Path:
    """`<dir>/averaged/<newest>.avg-<scheme>-n<n><suffix>`, keeping the suffix Keras expects.

    `<dir>` holds all the `files`, so checkpoints saved in folders by epoch
    (`ckpts/epoch_5/model.keras`) give `ckpts/averaged/epoch_5_model.avg-...`, never a file
    inside a checkpoint. A metric value in the newest's name (`model-0.53-05.keras`) is
    left out: it describes the newest checkpoint, not the average.
    """
    root = common_dir(files)
    names = below(newest.path, root)
    name = "_".join(names)
    stem = name.removesuffix(SUFFIXES[newest.format])
    if newest.format not in FOLDERS:
        stem = stem.removesuffix(newest.path.suffix)
    stem = without_metrics(stem) or stem
    suffix = SUFFIXES[newest.format] if newest.format != "legacy-h5" else newest.path.suffix
    if len(names) == 1:
        parent = newest.path.parent
    else:  # as the inputs were given: relative paths stay relative
        parent = root if newest.path.is_absolute() else Path(os.path.relpath(root))
    return parent / OUTPUT_DIR / f"{stem}.avg-{scheme}-n{len(files)}{suffix}"


def destination(
    output: str | os.PathLike | None, newest: Reader, scheme: str, files: Sequence[Path]
) -> Path:
    """Where an average of `files` (the newest last) goes: `output`, the default name
    inside `output` if that is a directory (or ends in "/"), or the default output.

    Refuses a name Keras would not read as the inputs' format.
    """
    if output is None:
        return default_output(newest, scheme, files)
    dest = as_path(output)
    folder = newest.format in FOLDERS
    inside = dest.is_dir() and not dest.is_symlink() and not (folder and is_checkpoint_dir(dest))
    if str(output).endswith(("/", os.sep)) or inside:
        return dest / default_output(newest, scheme, files).name
    if folder:
        if dest.name.endswith(".keras"):
            raise UsageError(
                f"{dest}: the inputs are {newest.format} folders, which Keras does not read "
                "under a name ending in .keras"
            )
        return dest
    suffixes = ACCEPTED[newest.format]
    legacy_as_weights = newest.format.startswith("legacy") and dest.name.endswith(".weights.h5")
    if not dest.name.endswith(suffixes) or legacy_as_weights:
        keras = newest.format.startswith(("keras", "legacy"))
        loader = "Keras reads" if keras else "their readers read"
        raise UsageError(
            f"{dest}: the inputs are {newest.format} files, so {loader} the output only "
            f"under a name ending in {' or '.join(suffixes)}"
            + (" (not .weights.h5)" if newest.format.startswith("legacy") else "")
        )
    return dest


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
