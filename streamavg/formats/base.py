"""What every container's adapter shares: the tensor record, the reader's interface, and
the checks and messages that do not depend on the container."""

from __future__ import annotations

import math
import os
import posixpath
import stat
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import StreamavgError
from ..publish import atomic_dir, atomic_output

PROVENANCE_KEY = "streamavg"  # where every output records how it was made


class Tensor(NamedTuple):
    """One stored tensor. `dtype` is the logical dtype (bfloat16 for Keras's opaque 2-byte data)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    part: str  # "model", "optimizer" or "other"
    stored: np.dtype  # as the container's reader fills a buffer: bfloat16 in HDF5 is "V2"

    @property
    def averaged(self) -> bool:
        """Floating-point model weights can be averaged; the rest is compared, copied or
        dropped (see `engine.to_average`)."""
        return self.part == "model" and self.dtype.kind in "fV"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


#: A writer's `write(name, values, index)`: block `index` of tensor `name` (`()`: all of it).
Write = Callable[[str, np.ndarray, tuple[slice, ...]], None]


class Reader:
    """An open checkpoint of some container: its tensors, and block reads into buffers.

    Adapters set `path`, `format` (the name `inspect` prints) and `tensors` (the model's,
    and the optimizer's when asked for), and implement `read`, `close` and `write_into`.
    """

    path: Path
    format: str
    tensors: dict[str, Tensor]
    size: int  # bytes on disk, all files together
    open_files = 1  # the files it holds open between reads (shards)

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        """Read block `index` of tensor `name` (`()`: all of it) into `out`, in the stored
        dtype; failures name the file and the tensor. Blocks come from `blocks.blocks`."""
        raise NotImplementedError

    def read_whole(self, name: str) -> np.ndarray:
        """All of tensor `name`, in its logical dtype."""
        t = self.tensors[name]
        out = np.empty(t.shape, t.stored)
        self.read(name, (), out)
        return out.view(t.dtype)

    folder = False  # whether a checkpoint of this container is a folder, not a file

    @contextmanager
    def write_like(
        self,
        dest: Path,
        fresh: Collection[str],
        *,
        optimizer: bool,
        provenance: dict,
        overwrite: bool,
    ) -> Iterator[Write]:
        """Write a checkpoint laid out like this one at `dest`, published atomically when
        the block ends; yield `write`, which fills the `fresh` tensors (blocks in any order,
        from any thread). The other model tensors are copied from this checkpoint, and its
        optimizer state too if `optimizer`; `provenance` is recorded in the output."""
        need = sum(self.tensors[n].nbytes for n in fresh)
        publish = atomic_dir if self.folder else atomic_output
        with (
            publish(dest, overwrite, need=need) as tmp,
            self.write_into(tmp, fresh, optimizer=optimizer, provenance=provenance) as write,
        ):
            yield write

    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> AbstractContextManager[Write]:
        """What `write_like` does inside the temporary file or folder `tmp`."""
        raise NotImplementedError

    @property
    def provenance(self) -> dict | None:
        """What an earlier streamavg run recorded in this checkpoint, if it made it."""
        return None

    def whole_reads(self, name: str) -> bool:
        """Whether reading any block of tensor `name` decodes all of it (one compressed
        chunk), so that the fold reads it once, whole, from each checkpoint in turn."""
        return False

    def layer(self, name: str) -> str:
        """The layer tensor `name` belongs to, whose tensors are averaged or taken together
        (a quantized kernel with its scale): its group, in a file of groups."""
        return posixpath.dirname(name)

    def stored_name(self, name: str) -> str:
        """What tensor `name` is called in the file (the same, unless the adapter renamed it)."""
        return name

    def settle(self, release: bool) -> None:
        """Let go of what block reads do not need, once the checkpoint has been checked; with
        `release`, close every file between reads (more checkpoints than open files allow)."""

    def check_unchanged(self) -> None:
        """Refuse a checkpoint whose files changed since it was opened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuse what is not a regular file before opening it: a FIFO or a device would
    block the read or never end, and a directory is not one checkpoint."""
    path = Path(path)
    st = stat_of(path)
    if stat.S_ISDIR(st.st_mode):
        raise StreamavgError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise StreamavgError(f"{path}: not a regular file (a device, FIFO or socket)")


def stat_of(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise StreamavgError(f"{path}: no such file") from None
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None


def pread_into(
    fd: int | None, path: Path, known: tuple[int, ...], offset: int, out: np.ndarray
) -> None:
    """Fill `out` from byte `offset` of the open file `fd`, or, where the file was let go
    of (`fd` None), of `path` opened again and checked to be the file `known` (see
    `identity`); a short read is an OSError."""
    own = os.open(path, os.O_RDONLY) if fd is None else None
    try:
        if own is not None:
            check_same(path, known, os.fstat(own))
        got = os.preadv(fd if own is None else own, [out.reshape(-1).view(np.uint8)], offset)
    finally:
        if own is not None:
            os.close(own)
    if got != out.nbytes:
        raise OSError("unexpected end of file")


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while a file is being read: which file, its size, its mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_same(path: Path, known: tuple[int, ...], st: os.stat_result | None = None) -> None:
    """Refuse a file that changed since it was opened: it is still being written."""
    try:
        st = st or path.stat()
    except OSError:
        raise StreamavgError(f"{path}: removed while being averaged") from None
    if identity(st) != known:
        raise StreamavgError(f"{path}: changed while being averaged (still being written?)")
