"""Putting outputs in place: written under a temporary name beside the destination, made
durable, then renamed onto it, so no reader ever sees a half-written checkpoint.

A file is published with one rename (or a hard link, which refuses an existing name); a
folder (an unzipped `.keras`, a sharded checkpoint) with one rename of the whole folder.

Every temporary entry is a folder beside the destination, `.DEST.streamavg-XXXXXXXX.KIND`
(a random token; KIND `tmp` for a folder being written, `file` for the folder holding a
file being written, `old` for a replaced output on its way out), on which the run making
it holds an exclusive `flock` until it is done with it. A run removes the entries of that
form in its output's folder that it can lock: leftovers of runs that died, whose locks the
kernel let go of, and never an entry of a live run, whatever its process, PID namespace,
container or host. A file gets a folder of its own because HDF5 locks the files it writes
itself (a second lock on the file would make it refuse to open it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import shutil
import stat
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
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

    The temporary file is `.DEST.streamavg-XXXXXXXX.file/DEST.tmp` (`DEST` alone when it
    ends with `suffix`), in a folder that this run holds locked until the block ends: the
    next run in that folder removes it if this one dies, never while it lives.
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

    The temporary folder is `.DEST.streamavg-XXXXXXXX.tmp`, locked as a file's is. An
    existing `dest` (with `overwrite`) is first moved aside, into a locked folder of its
    own, then removed once the new folder is in place: a crash in between leaves no `dest`,
    never a mix of old and new.
    """
    with _staged(dest, need, folder=True) as tmp:
        yield tmp
        _publish_dir(tmp, dest, overwrite)


@contextmanager
def _staged(dest: Path, need: int, *, folder: bool, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file or folder beside `dest`, made for it and locked; removed, with the
    directories made for `dest`, unless the caller has moved it into place when the block
    ends. The lock is let go of last, once it is gone or in place."""
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    with ExitStack() as held:
        entry = fd = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(dest.parent)
            entry, fd = _claim(dest, "tmp" if folder else "file", held)
            tmp = entry
            if not folder:
                tmp = entry / (dest.name if dest.name.endswith(suffix) else dest.name + suffix)
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            _discard(entry, fd, made)
            raise StreamavgError(f"{dest}: cannot write ({why(e)})") from None
        except BaseException:
            _discard(entry, fd, made)
            raise
        try:
            _check_space(dest, need)
            yield tmp
        except WRITE_ERRORS as e:  # from the writers: reading errors are StreamavgErrors by now
            _discard(entry, fd, made)
            raise StreamavgError(f"{dest}: cannot write ({why(e)})") from None
        except BaseException:
            _discard(entry, fd, made)
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
    """Move `tmp` onto `dest`; without `overwrite`, atomically refuse an existing `dest`.
    Then remove the temporary folder that held `tmp`."""
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
    tmp.parent.rmdir()


def _publish_dir(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move folder `tmp` onto `dest`. Without `overwrite`, an empty folder made at `dest`
    claims the name (mkdir refuses an existing one), then the rename replaces it."""
    _durable(tmp)
    with ExitStack() as held:
        aside = None
        if not overwrite:
            try:
                dest.mkdir()
            except FileExistsError:
                raise already_exists(dest) from None
        elif dest.exists() or dest.is_symlink():
            aside, _ = _claim(dest, "old", held)
            os.replace(dest, aside / dest.name)  # into the locked folder: no run removes it
        try:
            os.replace(tmp, dest)
        except BaseException:
            if not overwrite:
                dest.rmdir()  # the claim, still empty
            raise
        sync(dest.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


TEMP_MARK = ".streamavg-"  # in every temporary name: `.DEST.streamavg-XXXXXXXX.KIND`
_TEMP = re.compile(rf"\.(.+){re.escape(TEMP_MARK)}[a-z0-9_]{{8}}\.(tmp|file|old)")
_UNLOCKABLE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}  # flock unsupported


def _claim(dest: Path, kind: str, held: ExitStack) -> tuple[Path, int]:
    """A new empty folder beside `dest`, `.DEST.streamavg-XXXXXXXX.KIND`, and a descriptor
    of it holding an exclusive lock on it until `held` closes.

    A run cleaning up may lock the folder between its making and its locking here, and
    remove it: once the lock is ours, the folder must still be at its name, or another is
    made. Where the file system has no such locks, the folder is not locked, and no run
    can lock it either to remove it."""
    while True:
        prefix, suffix = f".{dest.name}{TEMP_MARK}", f".{kind}"
        path = Path(tempfile.mkdtemp(dir=dest.parent, prefix=prefix, suffix=suffix))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed already
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a run that locked it first
            except OSError as e:
                if e.errno not in _UNLOCKABLE:
                    raise
            mine = _names(path, fd)
        except BaseException:
            os.close(fd)
            raise
        if mine:
            held.callback(os.close, fd)  # closing it lets go of the lock
            return path, fd
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is (still) the file or folder open as `fd`."""
    try:
        at = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (at.st_dev, at.st_ino) == (st.st_dev, st.st_ino)


def published(path: Path) -> Path:
    """Where `path`, a temporary file or a file in a temporary folder (see `_claim`), will
    be once its output is published."""
    names = []
    for part in path.parts:
        temp = _TEMP.fullmatch(part)
        names.append(part if temp is None else temp[1])
        if temp is not None and temp[2] == "file":
            break  # the folder holding the file: the file is published under its name
    return Path(*names)


def _remove_leftovers(directory: Path) -> None:
    """Delete the temporary files and folders in `directory` that no live run holds
    locked: those of runs that died (and leftovers of versions that named them
    `.DEST.streamavg-PID@HOST.XXXXXXXX.SUFFIX`, unlocked)."""
    for path in directory.glob(f".*{TEMP_MARK}*"):
        with suppress(OSError):  # BlockingIOError: locked by its maker, alive
            _remove_unlocked(path)


def _remove_unlocked(path: Path) -> None:
    """Lock `path`, a file or folder, and remove it while holding the lock, if it is
    still at that name; an error if another holds it locked."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _names(path, fd):  # removed, and another put in its place, meanwhile
            return
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    finally:
        os.close(fd)


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
    code = system_errno(e)
    return os.strerror(code) if code else reason(e)


def _discard(entry: Path | None, fd: int | None, made: list[Path]) -> None:
    """Remove temporary folder `entry`, open as `fd`, unless not made or moved into place;
    then the directories in `made`."""
    if entry is not None and fd is not None and _names(entry, fd):
        shutil.rmtree(entry, ignore_errors=True)
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
