"""One adapter per checkpoint container, and the choice among them by name and content.

Each module reads one container (list its tensors, read a block into a caller's buffer,
check that it is unchanged) and writes it (lay out the output like the newest input,
write blocks at their places, publish atomically). The rest of streamavg names no
container: it opens checkpoints here and asks the newest for its writer.

An adapter module has `SUFFIXES` (format -> suffix of a default output, "" for a
folder), `ACCEPTED` (format -> the names its loader reads a file under), `claims(path,
head)` (whether it reads `path`, a folder or a file starting with bytes `head`),
`open_checkpoint(path, optimizer=, like=)` (`like` may be ignored) and `averaged(path)`;
and `parts(directory)` if its checkpoints span several files of one folder (shards),
which a scan must not take alone.

>>> with open_checkpoint("ckpts/model_10.keras") as ck:  # doctest: +SKIP
...     ck.format, list(ck.tensors)[:1]
('keras', ['layers/dense/vars/0'])
"""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from types import ModuleType

from ..errors import StreamavgError
from ..remote import as_path
from . import bundle, hdf5, keras_sharded, keras_zip, orbax, safetensors
from .base import PROVENANCE_KEY, Reader, Tensor, open_file, require_regular_file, stat_of
from .bundle import SHARD

__all__ = [
    "ACCEPTED",
    "FOLDERS",
    "PROVENANCE_KEY",
    "SHARD",
    "SUFFIXES",
    "Reader",
    "Tensor",
    "averaged_by_streamavg",
    "being_written",
    "check_checkpoint",
    "format_of",
    "holds_weights",
    "is_checkpoint_dir",
    "open_checkpoint",
    "parts",
    "require_regular_file",
]

#: The adapters, in the order they are asked to claim a path.
ADAPTERS: tuple[ModuleType, ...] = (bundle, keras_sharded, keras_zip, safetensors, orbax, hdf5)
SUFFIXES = {f: s for a in ADAPTERS for f, s in a.SUFFIXES.items()}
ACCEPTED = {f: s for a in ADAPTERS for f, s in a.ACCEPTED.items()}
FOLDERS = tuple(f for f, s in SUFFIXES.items() if not s)  # checkpoints that are folders


def _adapter(path: Path) -> ModuleType:
    """The module that reads `path`: a folder by what it holds, a file by name or content."""
    stat_of(path)  # refuses a missing path
    head, folder = b"", path.is_dir()
    if not folder:
        require_regular_file(path)
        try:
            with closing(open_file(path)) as f:
                head = f.read(0, 16)
        except OSError as e:
            raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None
    found = next((a for a in ADAPTERS if a.claims(path, head)), None)
    if found is not None:
        return found
    if folder:
        raise StreamavgError(f"{path}: is a directory, not a checkpoint")
    raise StreamavgError(f"{path}: not a checkpoint (neither HDF5, .keras nor safetensors)")


def format_of(path: str | os.PathLike) -> str:
    """The format of checkpoint `path`: told by its adapter, which opens it only where it
    reads several (HDF5's kinds, checkpoint folders)."""
    path = as_path(path)
    adapter = _adapter(path)
    if len(adapter.SUFFIXES) == 1:
        return next(iter(adapter.SUFFIXES))
    with adapter.open_checkpoint(path) as ck:
        return ck.format


def check_checkpoint(path: str | os.PathLike) -> None:
    """Refuse, in one line, a path that no adapter reads."""
    _adapter(as_path(path))


def holds_weights(path: Path) -> bool:
    """Whether folder `path` is a checkpoint by the weights files in it (not an Orbax
    root): a Trainer's output_dir, say, holding the final model beside its checkpoints."""
    return bundle.kind(path) is not None


def open_checkpoint(
    path: str | os.PathLike, *, optimizer: bool = False, like: Reader | None = None
) -> Reader:
    """Open the checkpoint at `path` (metadata only), listing the model's tensors, and the
    optimizer's too if `optimizer`; refuses, in one line, what it cannot read.

    `like` is an open checkpoint of the same run: an adapter may share its listing with
    `path` when it can prove them built alike, which is much faster than listing again.
    """
    path = as_path(path)
    adapter = _adapter(path)
    if like is not None and like.format in adapter.SUFFIXES:
        return adapter.open_checkpoint(path, optimizer=optimizer, like=like)
    return adapter.open_checkpoint(path, optimizer=optimizer)


def averaged_by_streamavg(path: str | os.PathLike) -> bool:
    """Whether `path` is an earlier streamavg output (it carries our provenance). A file
    that cannot be read says no here, and is refused with its reason when opened."""
    path = as_path(path)
    try:
        adapter = _adapter(path)
    except StreamavgError:
        return False
    return adapter.averaged(path)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether folder `path` is itself one checkpoint (an unzipped `.keras`, ...)."""
    return path.is_dir() and any(a.claims(path, b"") for a in ADAPTERS)


def being_written(path: Path) -> str | None:
    """Why folder `path`, which is no checkpoint, looks like one still being written."""
    return bundle.missing(path)


def parts(directory: Path) -> dict[str, Path]:
    """The files in `directory` that are parts of a checkpoint there (shards listed by a
    manifest), by name, each with the checkpoint it belongs to."""
    return {
        name: owner
        for a in ADAPTERS
        if hasattr(a, "parts")
        for name, owner in a.parts(directory).items()
    }
