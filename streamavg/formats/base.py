"""What every container's adapter shares: the tensor record, the reader's interface, and
the checks and messages that do not depend on the container."""

from __future__ import annotations

import math
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from ..casts import named_dtype
from ..errors import StreamavgError
from ..publish import atomic_dir, atomic_output
from ..remote import RemoteFile, as_path, errors, is_url
from ..window import Window

PROVENANCE_KEY = "streamavg"  # where every output records how it was made


class Tensor(NamedTuple):
    """One stored tensor: `logical` names the dtype its tool meant (bfloat16 for Keras's
    opaque 2-byte data), `stored` how the container's reader fills a buffer with it."""

    name: str
    shape: tuple[int, ...]
    logical: str  # a numpy or ml_dtypes name: "float32", "bfloat16", "int8", ...
    part: str  # "model", "optimizer" or "other"
    stored: np.dtype  # bfloat16 is "V2" in HDF5, "<u2" in safetensors

    @property
    def dtype(self) -> np.dtype:
        """The logical dtype (ml_dtypes is imported only here, for its types)."""
        return named_dtype(self.logical)

    @property
    def averaged(self) -> bool:
        """Floating-point model weights can be averaged; the rest is compared, copied or
        dropped (see `engine.to_average`)."""
        return self.part == "model" and self.logical.startswith(("float", "bfloat"))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.stored.itemsize


class Targets(NamedTuple):
    """Where other processes may write fresh tensors themselves, as a writer's `write`
    offers them (`write.targets`): by name, the file and the offset of its data (written
    with `os.pwritev`); and, for a `.keras` archive (one file), where the CRC-32 of each
    range written must go."""

    places: dict[str, tuple[Path, int]]
    checksums: dict[int, tuple[int, int]] | None


class Companion(NamedTuple):
    """A file that travels with a checkpoint's weights (config, tokenizer, assets): copied
    from the newest checkpoint into the output, never held whole in memory.

    `role` says what an average does with it: "meaning" files give the weights their
    meaning (the architecture in a model config, vocabularies and other assets, tokenizer
    files) and must be the same in every checkpoint; "copy" files (a README, a generation
    config) are taken from the newest; "state" files (optimizer, scheduler, RNG state) are
    training state, left out unless the newest's optimizer state is kept. A JSON companion
    (`json`) is compared as a document, without the keys that change from save to save
    (versions, dates, auto-generated names; see `companions.VOLATILE`).
    """

    name: str  # as messages name it, relative to the checkpoint: "config.json", "assets/vocab.txt"
    size: int
    chunks: Callable[[], Iterator[bytes]]  # its bytes, in pieces of at most a few MiB
    role: str = "meaning"
    json: bool = False


@runtime_checkable
class Write(Protocol):
    """What a writer yields: `write(name, values, index)` fills block `index` of tensor
    `name` (`()`: all of it), from any thread; `targets` says where other processes may
    write the tensors themselves (None where they cannot: chunked, compressed)."""

    targets: Targets | None

    def __call__(self, name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None: ...


@runtime_checkable
class Reader(Protocol):
    """An open checkpoint, as the engine, the CLI, Dask and the callbacks use it, whatever
    its container: its tensors, block reads, checks, and a writer of a checkpoint like it.
    Every adapter's checkpoints implement it (most through `ReaderBase`)."""

    path: Path
    format: str
    tensors: dict[str, Tensor]
    size: int
    open_files: int
    folder: bool

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None: ...
    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None: ...
    def read_whole(self, name: str) -> np.ndarray: ...
    def whole_reads(self, name: str) -> bool: ...
    def layer(self, name: str) -> str: ...
    def stored_name(self, name: str) -> str: ...
    def match(self, ref: Reader) -> None: ...
    def check_heaps(self) -> None: ...
    def settle(self, release: bool) -> None: ...
    def check_unchanged(self) -> None: ...
    def companions(self) -> list[Companion]: ...
    def attribute(self, key: str) -> str | None: ...
    def write_like(
        self,
        dest: Path,
        fresh: Collection[str],
        *,
        optimizer: bool,
        provenance: dict,
        overwrite: bool,
    ) -> AbstractContextManager[Write]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Reader: ...
    def __exit__(self, *exc: object) -> None: ...

    @property
    def provenance(self) -> dict | None: ...

    @property
    def files(self) -> list[str]: ...


@runtime_checkable
class Adapter(Protocol):
    """A container's module: which formats it reads, under which names their loaders
    read them, whether it reads a path, and how it opens one."""

    SUFFIXES: dict[str, str]  # format -> the suffix of a default output ("" for a folder)
    ACCEPTED: dict[str, tuple[str, ...]]  # format -> the names its loader reads a file under

    def claims(self, path: Path, head: bytes) -> bool: ...
    def open_checkpoint(
        self, path: Path, *, optimizer: bool = False, like: Reader | None = None
    ) -> Reader: ...
    def averaged(self, path: Path) -> bool: ...


class ReaderBase:
    """What most readers share (see `Reader`): adapters set `path`, `format` (the name
    `inspect` prints) and `tensors` (the model's, and the optimizer's when asked for), and
    implement `read`, `close` and `write_into`; the rest has defaults.
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

    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None:
        """Start fetching block `index` of tensor `name`, which `read` will ask for soon
        (a checkpoint in object storage), in one request with the blocks prefetched just
        before it if they are adjacent and all fit in `merge` bytes; reads from a disk
        need no such hint."""

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

    @property
    def files(self) -> list[str]:
        """The names of the weights files it reads (one, but for sharded or folder ones)."""
        return [self.path.name]

    def companions(self) -> list[Companion]:
        """The files that travel with the weights (see `Companion`), in a stable order."""
        return []

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

    def match(self, ref: Reader) -> None:
        """Make this checkpoint's tensor names `ref`'s where its loader matches them
        otherwise than by name (a legacy `.h5` file, by layer position)."""

    def attribute(self, key: str) -> str | None:
        """A text attribute that the weights file carries at its root (HDF5), if any."""
        return None

    def check_heaps(self) -> None:
        """Refuse metadata that a library would loop on forever when decoding it (see
        `hdf5.Checkpoint.check_heaps`): call before a library reads the checkpoint's
        attributes (Keras loading it)."""

    def settle(self, release: bool) -> None:
        """Let go of what block reads do not need, once the checkpoint has been checked; with
        `release`, close every file between reads (more checkpoints than open files allow)."""

    def check_unchanged(self) -> None:
        """Refuse a checkpoint whose files changed since it was opened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ReaderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PIECE = 1 << 20  # bytes of a companion read at a time


def file_companion(path: Path, name: str, role: str = "meaning") -> Companion:
    """File `path` (on disk or in a store) as a companion named `name`, read a piece at a
    time; a JSON file by its name."""

    def chunks() -> Iterator[bytes]:
        try:
            with path.open("rb") as f:
                while chunk := f.read(PIECE):
                    yield chunk
        except OSError as e:
            raise StreamavgError(f"{path}: cannot read ({e.strerror or e})") from None

    return Companion(name, stat_of(path).st_size, chunks, role, name.endswith(".json"))


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuse what is not a regular file before opening it: a FIFO or a device would
    block the read or never end, and a directory is not one checkpoint."""
    path = as_path(path)
    st = stat_of(path)
    if stat.S_ISDIR(st.st_mode):
        raise StreamavgError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise StreamavgError(f"{path}: not a regular file (a device, FIFO or socket)")


def stat_of(path: Path) -> os.stat_result:
    if is_url(path):
        with errors(path):
            return path.stat()
    try:
        return path.stat()
    except FileNotFoundError:
        raise StreamavgError(f"{path}: no such file") from None
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None


class LocalFile:
    """A file on disk opened for reads at offsets (`os.preadv`, without the GIL), checked
    to be unchanged by its identity; once `release`d, each read opens it again by path
    and checks that it is still the same file. `remote.RemoteFile` answers the same calls.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        st = stat_of(path)
        self.size, self._identity = st.st_size, identity(st)
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Fill `out` from byte `offset`; a short read is an OSError."""
        with self._open() as fd:
            got = os.preadv(fd, [out.reshape(-1).view(np.uint8)], offset)
        if got != out.nbytes:
            raise OSError("unexpected end of file")

    def read(self, offset: int, size: int) -> bytes:
        with self._open() as fd:
            return os.pread(fd, size, offset)

    def prefetch(self, offset: int, size: int, merge: int = 0) -> None:
        """Nothing to do: the page cache and the disk read ahead."""

    def skip(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Nothing to do: a library's copy of the data reads it from the page cache."""

    def handle(self) -> str:
        """What a library opens (h5py, zipfile): the path, for its own, fastest, I/O."""
        return os.fspath(self.path)

    def window(self, start: int, size: int) -> Window:
        """Bytes [start, start+size) as a file object (a `.keras` archive's member)."""
        return Window(self._readinto, start, size)

    def _readinto(self, offset: int, buf: memoryview) -> int:
        with self._open() as fd:
            return os.preadv(fd, [buf], offset)

    @contextmanager
    def _open(self) -> Iterator[int]:
        if self._fd is not None:
            yield self._fd
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            check_same(self.path, self._identity, os.fstat(fd))
            yield fd
        finally:
            os.close(fd)

    def release(self) -> None:
        """Close the file between reads (more checkpoints than open files allow)."""
        self.close()

    def check_unchanged(self) -> None:
        check_same(self.path, self._identity)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def copy_out(source: Path, dest: Path) -> None:
    """Copy file or folder `source` (on disk or in a store) to `dest` on disk."""
    if is_url(source):
        with errors(source):
            source.fs.get(source.path, os.fspath(dest), recursive=source.is_dir())
    else:
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, dest)


def open_file(path: str | os.PathLike) -> LocalFile:
    """`path` opened for reads at offsets: a `LocalFile`, or a `remote.RemoteFile` for an
    object in a store (which has the same methods)."""
    path = as_path(path)
    return RemoteFile(path) if is_url(path) else LocalFile(path)


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while a file is being read: which file, its size, its mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_same(path: Path, known: tuple[int, ...], st: os.stat_result | None = None) -> None:
    """Refuse a file that changed since it was opened: it is still being written."""
    if is_url(path):  # ask the store, not what a listing cached
        path.fs.invalidate_cache(path.path)
    try:
        st = st or path.stat()
    except OSError:
        raise StreamavgError(f"{path}: removed while being averaged") from None
    if identity(st) != known:
        raise StreamavgError(f"{path}: changed while being averaged (still being written?)")
