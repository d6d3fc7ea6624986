"""Putting outputs in place: written under a temporary name beside the destination, made
durable, then renamed onto it, so no reader ever sees a half-written checkpoint.

A file is published with one rename (or a hard link, which refuses an existing name); a
folder (an unzipped `.keras`, a sharded checkpoint) with one rename of the whole folder.
Leftovers of killed runs carry the process and host in their names and are removed by the
next run in that folder.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .blocks import flat_start
from .errors import WRITE_ERRORS, StreamavgError, UsageError, option, reason, system_errno

FLUSH_BYTES = 64 << 20  # start writing to disk after this much new data, not all at the end


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
    with _staged(dest, need, folder=False, suffix=suffix) as tmp:
        yield tmp
        _publish_file(tmp, dest, overwrite)


@contextmanager
def atomic_dir(dest: Path, overwrite: bool, *, need: int = 0) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; durably move it onto `dest` if the block
    succeeds, as :func:`atomic_output` does for a file.

    An existing `dest` (with `overwrite`) is first renamed aside, then removed once the new
    folder is in place: a crash in between leaves no `dest`, never a mix of old and new.
    """
    with _staged(dest, need, folder=True) as tmp:
        yield tmp
        _publish_dir(tmp, dest, overwrite)


@contextmanager
def _staged(dest: Path, need: int, *, folder: bool, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file or folder beside `dest`, made for it; removed, with the directories
    made for `dest`, unless the caller has moved it into place when the block ends."""
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(dest.parent)
        tmp = _temp(dest, suffix, folder)
    except OSError as e:
        _remove_dirs(made)
        raise StreamavgError(f"{dest}: cannot write ({why(e)})") from None
    except BaseException:
        _remove_dirs(made)
        raise
    try:
        _check_space(dest, need)
        yield tmp
    except WRITE_ERRORS as e:  # from the writers: reading errors are StreamavgErrors by now
        _discard(tmp, made)
        raise StreamavgError(f"{dest}: cannot write ({why(e)})") from None
    except BaseException:
        _discard(tmp, made)
        raise


def _durable(path: Path) -> None:
    """Give `path` (a file, or a folder and all in it) the umask's mode, then fsync it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        sync(p)


def sync(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: renames and links in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def already_exists(dest: Path) -> UsageError:
    """The refusal to replace `dest` without --overwrite."""
    return UsageError(f"{dest}: already exists (pass {option('overwrite', True)} to replace it)")


def _publish_file(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move `tmp` onto `dest`; without `overwrite`, atomically refuse an existing `dest`."""
    _durable(tmp)
    if overwrite:
        os.replace(tmp, dest)
    else:
        try:
            os.link(tmp, dest)  # fails if dest exists, even if it appeared a moment ago
        except FileExistsError:
            raise already_exists(dest) from None
        except OSError:  # no hard links on this file system: check, then rename
            if dest.exists() or dest.is_symlink():
                raise already_exists(dest) from None
            os.replace(tmp, dest)
        else:
            tmp.unlink()
    sync(dest.parent)


def _publish_dir(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move folder `tmp` onto `dest`. Without `overwrite`, an empty folder made at `dest`
    claims the name (mkdir refuses an existing one), then the rename replaces it."""
    _durable(tmp)
    aside = None
    if not overwrite:
        try:
            dest.mkdir()
        except FileExistsError:
            raise already_exists(dest) from None
    elif dest.exists():
        aside = _temp(dest, ".old", folder=True)
        os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if not overwrite:
            dest.rmdir()  # the claim, still empty
        raise
    sync(dest.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


TEMP_MARK = ".streamavg-"  # every temporary name: `.DEST.streamavg-PID@HOST.XXXXXXXX.SUFFIX`
_OWNER = re.compile(re.escape(TEMP_MARK) + r"(\d+)@([\w-]*)\.")


def _host() -> str:
    return re.sub(r"[^\w-]", "-", os.uname().nodename)


def _temp(dest: Path, suffix: str, folder: bool) -> Path:
    """A new temporary file or folder beside `dest`, named for this process so leftovers
    can be told."""
    prefix = f".{dest.name}{TEMP_MARK}{os.getpid()}@{_host()}."
    if folder:
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=prefix, suffix=suffix))
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def published(path: Path) -> Path:
    """Where `path`, a temporary file or a file in a temporary folder (see `_temp`), will be
    once its output is published."""
    names = [p[1 : p.index(TEMP_MARK)] if _OWNER.search(p) else p for p in path.parts]
    return Path(*names)


def _remove_leftovers(directory: Path) -> None:
    """Delete temporary files that runs on this host left in `directory` when they died."""
    for path in directory.glob(f".*{TEMP_MARK}*"):
        owner = _OWNER.search(path.name)
        if owner is None or owner[2] != _host() or _alive(int(owner[1])):
            continue
        with suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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


def why(e: BaseException) -> str:
    """The system's reason for a failed write, also when HDF5 reports it inside its message."""
    errno = system_errno(e)
    return os.strerror(errno) if errno else reason(e)


def _discard(tmp: Path, made: list[Path]) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    _remove_dirs(made)


def _remove_dirs(made: list[Path]) -> None:
    for d in made:
        with suppress(OSError):
            d.rmdir()


class OffsetWriter:
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

    def write_block(
        self, offset: int, shape: tuple[int, ...], index: tuple[slice, ...], values: np.ndarray
    ) -> None:
        """Write block `index` (see `blocks.blocks`) of a C-ordered tensor of `shape` whose
        data starts at byte `offset`."""
        data = np.ascontiguousarray(values)
        self.write(offset + flat_start(shape, index) * data.itemsize, data)

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
