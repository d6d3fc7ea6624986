"""Writing results: a checkpoint laid out like a template, put in place atomically."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import tempfile
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import h5py
import numpy as np

from .blocks import flat_start
from .errors import StreamavgError, UsageError, option
from .formats import (
    HDF5_ERRORS,
    OPTIMIZER_GROUP,
    PROVENANCE_ATTR,
    SUFFIXES,
    Checkpoint,
    reason,
    system_errno,
)
from .names import common_dir, without_metrics

FLUSH_BYTES = 64 << 20  # start writing to disk after this much new data, not all at the end
OUTPUT_DIR = "averaged"  # default outputs go here, out of reach of a later scan of the inputs


#: The names Keras reads each container under (`load_weights` takes `.weights.h5` for Keras 3
#: weights, so a legacy file must not be named so).
KERAS_SUFFIXES = {
    "keras": (".keras",),
    "keras-weights": (".weights.h5",),
    "legacy-h5": (".h5", ".hdf5"),
    "legacy-weights": (".h5", ".hdf5"),
}
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: str | os.PathLike) -> None:
    """Remote storage is not supported yet: a URL is refused rather than taken for a local path."""
    if _URL.match(os.fspath(path)):
        raise UsageError(
            f"{os.fspath(path)}: URLs (remote storage) are not supported yet; use a local path"
        )


def default_output(newest: Checkpoint, scheme: str, files: Sequence[Path]) -> Path:
    """`<dir>/averaged/<newest>.avg-<scheme>-n<n><suffix>`, keeping the suffix Keras expects.

    `<dir>` holds all the `files`, so checkpoints saved in folders by epoch
    (`ckpts/epoch_5/model.keras`) give `ckpts/averaged/epoch_5_model.avg-...`, never a file
    inside a checkpoint. A metric value in the newest's name (`model-0.53-05.keras`) is
    left out: it describes the newest checkpoint, not the average.
    """
    root = common_dir(files)
    below = Path(os.path.abspath(newest.path)).relative_to(root)
    name = "_".join(below.parts)
    stem = name.removesuffix(SUFFIXES[newest.format]).removesuffix(newest.path.suffix)
    stem = without_metrics(stem) or stem
    suffix = SUFFIXES[newest.format] if newest.format != "legacy-h5" else newest.path.suffix
    if len(below.parts) == 1:
        parent = newest.path.parent
    else:  # as the inputs were given: relative paths stay relative
        parent = root if newest.path.is_absolute() else Path(os.path.relpath(root))
    return parent / OUTPUT_DIR / f"{stem}.avg-{scheme}-n{len(files)}{suffix}"


def destination(
    output: str | os.PathLike | None, newest: Checkpoint, scheme: str, files: Sequence[Path]
) -> Path:
    """Where an average of `files` (the newest last) goes: `output`, the default name
    inside `output` if that is a directory (or ends in "/"), or the default output.

    Refuses a URL, and a name Keras would not read as the inputs' format.
    """
    if output is None:
        return default_output(newest, scheme, files)
    refuse_url(output)
    dest = Path(output)
    if os.fspath(output).endswith(os.sep) or (dest.is_dir() and not dest.is_symlink()):
        return dest / default_output(newest, scheme, files).name
    suffixes = KERAS_SUFFIXES[newest.format]
    legacy_as_weights = newest.format.startswith("legacy") and dest.name.endswith(".weights.h5")
    if not dest.name.endswith(suffixes) or legacy_as_weights:
        raise UsageError(
            f"{dest}: the inputs are {newest.format} files, so Keras reads the output only "
            f"under a name ending in {' or '.join(suffixes)}"
            + (" (not .weights.h5)" if newest.format.startswith("legacy") else "")
        )
    return dest


def check_output(dest: Path, inputs: Collection[Path], overwrite: bool) -> None:
    """Refuse an output that is one of the inputs, that exists without `overwrite`, or that
    is not a regular file (a device, FIFO or socket is never replaced)."""
    for p in inputs:
        if dest.resolve() == p.resolve() or (dest.exists() and os.path.samefile(dest, p)):
            raise UsageError(f"{dest}: output is one of the inputs")
    if dest.is_symlink():
        raise UsageError(f"{dest}: is a symbolic link (name its target, or remove the link)")
    if dest.is_dir():
        raise UsageError(f"{dest}: is a directory")
    if dest.exists() and not dest.is_file():
        raise UsageError(f"{dest}: is not a regular file (a device, FIFO or socket)")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest}: already exists (pass {option('overwrite', True)} to replace it)")


@contextmanager
def atomic_output(
    dest: Path, overwrite: bool, suffix: str = ".tmp", *, need: int = 0
) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; durably move it onto `dest` if the block succeeds.

    The temporary file is named `.DEST.streamavg-PID@HOST.XXXXXXXX.tmp`, so a killed run's
    leftovers are recognisable, and the next run in that folder removes them.
    On failure (or SIGINT/SIGTERM) the temporary file goes, and so do the directories made
    for `dest`. Without `overwrite`, the final step refuses an output that another run put
    in place meanwhile. `need` is a lower bound on the bytes to be written, checked first.
    The temporary name ends with `suffix`, for writers that insist on one (Keras).
    """
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(dest.parent)
        fd, tmp = _temp(dest, suffix)
    except OSError as e:
        _remove_dirs(made)
        raise StreamavgError(f"{dest}: cannot write ({_why(e)})") from None
    except BaseException:
        _remove_dirs(made)
        raise
    try:
        _check_space(dest, need)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.fsync(fd)
        _publish(tmp, dest, overwrite)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except HDF5_ERRORS as e:  # from the writers: reading errors are StreamavgErrors by now
        _discard(tmp, made)
        raise StreamavgError(f"{dest}: cannot write ({_why(e)})") from None
    except BaseException:
        _discard(tmp, made)
        raise
    finally:
        os.close(fd)


TEMP_MARK = ".streamavg-"  # every temporary name: `.DEST.streamavg-PID@HOST.XXXXXXXX.SUFFIX`
_OWNER = re.compile(re.escape(TEMP_MARK) + r"(\d+)@([\w-]*)\.")


def _host() -> str:
    return re.sub(r"[^\w-]", "-", os.uname().nodename)


def _temp(dest: Path, suffix: str) -> tuple[int, Path]:
    """A new temporary file beside `dest`, named for this process so leftovers can be told."""
    prefix = f".{dest.name}{TEMP_MARK}{os.getpid()}@{_host()}."
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=suffix)
    return fd, Path(name)


def _remove_leftovers(directory: Path) -> None:
    """Delete temporary files that runs on this host left in `directory` when they died."""
    for path in directory.glob(f".*{TEMP_MARK}*"):
        owner = _OWNER.search(path.name)
        if owner is None or owner[2] != _host() or _alive(int(owner[1])):
            continue
        with suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def _check_space(dest: Path, need: int) -> None:
    """Refuse to start when `need` bytes cannot fit: free space, or the file size limit."""
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise StreamavgError(
            f"{dest}: needs at least {need:,} bytes, only {free:,} free in {dest.parent}"
        )
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and need > limit:
        raise StreamavgError(
            f"{dest}: needs at least {need:,} bytes, above the file size limit of {limit:,}"
        )


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move `tmp` onto `dest`; without `overwrite`, atomically refuse an existing `dest`."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # fails if dest exists, even if it appeared a moment ago
    except FileExistsError:
        raise UsageError(
            f"{dest}: already exists (pass {option('overwrite', True)} to replace it)"
        ) from None
    except OSError:  # no hard links on this file system: check, then rename
        check_output(dest, (), overwrite)
        os.replace(tmp, dest)
        return
    tmp.unlink()


def _why(e: BaseException) -> str:
    """The system's reason for a failed write, also when HDF5 reports it inside its message."""
    errno = system_errno(e)
    return os.strerror(errno) if errno else reason(e)


def _discard(tmp: Path, made: list[Path]) -> None:
    tmp.unlink(missing_ok=True)
    _remove_dirs(made)


def _remove_dirs(made: list[Path]) -> None:
    for d in made:
        with suppress(OSError):
            d.rmdir()


@contextmanager
def h5_like(
    template: Checkpoint,
    path: Path,
    fresh: Collection[str],
    *,
    optimizer: bool,
    provenance: dict,
    userblock: int = 0,
    checksums: dict[int, tuple[int, int]] | None = None,
) -> Iterator[Callable[[str, np.ndarray, tuple[slice, ...]], None]]:
    """Write an HDF5 file shaped like `template`; yield `write(name, values, index=())`
    that fills the `fresh` tensors, whole or a block (from `blocks.blocks`) at a time.

    Groups, attributes, dtypes and storage layout are copied, and so are the other tensors
    with their data; the optimizer group is left out unless `optimizer` is true. Contiguous
    fresh tensors get their file space up front and are written with `os.pwritev`, which
    runs on any thread without the GIL; others go through h5py. The first `userblock`
    bytes are left for the caller (a `.keras` archive's zip header). If `checksums` is
    given, it receives the CRC-32 of every range written with `os.pwritev`, by offset:
    (size, crc), so a `.keras` archive need not read them back.
    """
    fresh = set(fresh)
    created: dict[str, h5py.Dataset] = {}
    offsets: dict[str, int] = {}
    dropped = None if optimizer else OPTIMIZER_GROUP.get(template.format)

    def replicate(src: h5py.Group, dst: h5py.Group) -> None:
        _copy_attrs(src, dst)
        for key, obj in src.items():
            name = obj.name[1:]
            if name == dropped:
                continue
            if isinstance(obj, h5py.Group):
                replicate(obj, dst.create_group(key))
            elif name in fresh:
                dcpl = obj.id.get_create_plist()
                dcpl.set_obj_track_times(False)  # no timestamps: the same inputs, the same bytes
                direct = dcpl.get_layout() == h5py.h5d.CONTIGUOUS and obj.dtype.isnative
                if direct:  # allocate now, and never let HDF5 write fill values over our data
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                dsid = h5py.h5d.create(
                    dst.id, key.encode(), obj.id.get_type(), obj.id.get_space(), dcpl=dcpl
                )
                created[name] = h5py.Dataset(dsid)
                _copy_attrs(obj, created[name])
                offset = dsid.get_offset() if direct else None
                if offset is not None:
                    offsets[name] = offset
            else:
                src.copy(obj, dst, key)

    out = h5py.File(path, "w", userblock_size=userblock)
    try:
        try:
            template.check_heaps()  # before any of its attributes is decoded
            replicate(template.h5, out)
        except HDF5_ERRORS as e:
            if system_errno(e):
                raise  # the output could not be written
            raise StreamavgError(f"{template.path}: corrupt HDF5 ({reason(e)})") from None
        out.attrs[PROVENANCE_ATTR] = json.dumps(provenance)
        writer = _FileWriter(path, checksums)
        try:

            def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
                ds = created[name]
                data = np.ascontiguousarray(values).view(ds.dtype)
                offset = offsets.get(name)
                if offset is None:
                    ds.write_direct(data, dest_sel=index or None)
                else:
                    writer.write(offset + flat_start(ds.shape, index) * data.itemsize, data)

            yield write
        finally:
            writer.close()
    except BaseException:
        with suppress(*HDF5_ERRORS):  # a close that fails too must not hide why we stopped
            out.close()
        raise
    out.close()


class _FileWriter:
    """Writes at file offsets from any thread, outside the GIL, and sends the data to disk
    in the background every FLUSH_BYTES, so little is left for the final fsync; what is on
    disk leaves the page cache, where it would crowd out the inputs. With `checksums`, it
    records each write's (size, CRC-32) there by offset."""

    def __init__(self, path: Path, checksums: dict[int, tuple[int, int]] | None) -> None:
        self._fd = os.open(path, os.O_WRONLY)
        self._checksums = checksums
        self._flusher = ThreadPoolExecutor(1)
        self._lock = threading.Lock()
        self._unflushed = 0
        self._flushing: Future | None = None

    def write(self, offset: int, data: np.ndarray) -> None:
        view = memoryview(data.reshape(-1).view(np.uint8))
        if self._checksums is not None:
            self._checksums[offset] = len(view), zlib.crc32(view)  # while it is in the cache
        while view:
            done = os.pwritev(self._fd, [view], offset)
            view, offset = view[done:], offset + done
        with self._lock:
            self._unflushed += data.nbytes
            if self._unflushed >= FLUSH_BYTES and not (self._flushing and self._flushing.running()):
                if self._flushing is not None:
                    self._flushing.result()  # finished: raises its error, if it had one
                self._unflushed = 0
                self._flushing = self._flusher.submit(self._flush)

    def _flush(self) -> None:
        os.fdatasync(self._fd)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        try:
            self._flusher.shutdown()
            if self._flushing is not None:
                self._flushing.result()
        finally:
            os.close(self._fd)


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    for key in src.attrs:
        dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
