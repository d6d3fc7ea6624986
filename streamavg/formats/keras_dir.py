"""Unzipped `.keras` models (`model.save(path, zipped=False)`): a folder of `config.json`,
`metadata.json` and `model.weights.h5`, which `keras.models.load_model(path)` reads.

The weights file is read by the HDF5 reader; the output is a folder like the newest
input's, its other files copied, published with one rename of the whole folder.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..remote import as_path
from . import hdf5
from .base import Write, copy_out

SUFFIXES = {"keras-dir": ""}  # a folder, under any name but *.keras
ACCEPTED: dict[str, tuple[str, ...]] = {}
WEIGHTS = "model.weights.h5"
CONFIG = "config.json"


def claims(path: Path, head: bytes) -> bool:
    """A folder is an unzipped `.keras` model if it holds Keras's config and weights."""
    return not head and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


class Folder(hdf5.Checkpoint):
    """An open unzipped `.keras` folder: the HDF5 reader over its weights file."""

    def __init__(
        self, path: str | os.PathLike, *, optimizer: bool = False, like: Folder | None = None
    ) -> None:
        path = as_path(path)
        file = path / WEIGHTS
        super().__init__(path, optimizer=optimizer, file=file, format="keras-dir", like=like)

    folder = True

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        for entry in sorted(self.path.iterdir()):  # config.json, metadata.json, assets/
            if entry.name != WEIGHTS:
                copy_out(entry, tmp / entry.name)
        with hdf5.h5_like(
            self, tmp / WEIGHTS, fresh, optimizer=optimizer, provenance=provenance
        ) as write:
            yield write


def averaged(path: Path) -> bool:
    return hdf5.averaged(path / WEIGHTS)


def open_checkpoint(path: Path, *, optimizer: bool = False, like: Folder | None = None) -> Folder:
    return Folder(path, optimizer=optimizer, like=like)
