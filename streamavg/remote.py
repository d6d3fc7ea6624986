"""Checkpoints and outputs in object storage (`s3://`, `gs://`, any protocol fsspec knows).

Inputs are listed and selected like local folders, through `UPath` (pathlib's interface
over fsspec), and read by byte ranges: the metadata through a small block cache, then
the tensors, fetched concurrently ahead of the fold (`RemoteFile.prefetch`). No object is
downloaded whole, and one that changes during the run is refused (its ETag).

Outputs are written to a local temporary file, then uploaded: an object store publishes
an object only once it is complete, so no reader sees part of it (on Dask, the workers
upload an S3 output's parts themselves: see `streamavg.cluster`).

Credentials and endpoints come from where the protocol's library looks (`AWS_*`,
`AWS_ENDPOINT_URL`, fsspec's configuration). Needs the `[remote]` extra.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import StreamavgError, UsageError, option
from .window import Window

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
EXTRA = "pip install 'streamavg[remote]'"
METADATA_BLOCK = 1 << 16  # bytes per cached read of a library's metadata lookups
FETCHES = 32  # byte-range requests in flight at once, over all files
HOLE = 64 << 10  # bytes a merged request reads through between two ranges, unused
METADATA_MERGE = 1 << 20  # bytes of metadata ranges merged into one request, at most
OPENERS = 16  # objects whose metadata is read at once (each read is a few round trips)
OUTPUT_MISSING = "no such bucket or folder"
CHANGED = "changed while being averaged (rewritten in the store)"
_pool = ThreadPoolExecutor(FETCHES, thread_name_prefix="streamavg-fetch")


def is_url(path: Any) -> bool:
    """Whether `path` names an object in a store: a URL, or a `UPath` made from one."""
    if path is None:
        return False
    if isinstance(path, (str, os.PathLike)):
        return bool(_URL.match(os.fspath(path)))
    return isinstance(getattr(path, "protocol", None), str)  # asking for `fs` would load it


def as_path(path: str | os.PathLike | Any) -> Path:
    """`path` as a `Path`, or as a `UPath` for a URL: both answer pathlib's questions
    (`is_dir`, `glob`, `stat`, `/`), so selection treats a bucket like a folder."""
    if not is_url(path):
        return Path(path)
    if not isinstance(path, (str, os.PathLike)):
        return path
    url = os.fspath(path)
    if url.lower().startswith("file://"):
        return Path(url[len("file://") :])
    if url.split("://", 1)[0].lower() in ("http", "https"):
        raise UsageError(f"{url}: HTTP cannot list folders; use object storage (s3://, gs://, ...)")
    try:
        from upath import UPath
    except ImportError:
        raise UsageError(f"{url}: remote storage needs the [remote] extra: {EXTRA}") from None
    with errors(url):
        return UPath(url)


def absolute(path: Path) -> Path:
    """`path` made absolute; a URL already is."""
    return path if is_url(path) else Path(os.path.abspath(path))


def _filesystem(url: str):
    if url.split("://", 1)[0].lower() in ("http", "https"):
        raise UsageError(f"{url}: HTTP is read-only; write to object storage (s3://, gs://, ...)")
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: remote storage needs the [remote] extra: {EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # the protocol's package is missing, or unknown
        raise UsageError(f"{url}: {e}") from None


def _error(url: str, e: BaseException, missing: str) -> StreamavgError:
    """One line for what the store answered."""
    if isinstance(e, StreamavgError):
        return e
    if type(e).__name__ == "NoCredentialsError":
        why = "no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or fsspec's config)"
    elif type(e).__name__ == "FileExpired":
        why = CHANGED
    elif isinstance(e, PermissionError):
        why = "access denied"
    elif isinstance(e, FileNotFoundError):
        why = missing
    elif isinstance(e, ImportError):  # the protocol's own package, which fsspec names
        return UsageError(f"{url}: {e}")
    else:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return StreamavgError(f"{url}: {why}")


@contextmanager
def errors(url: object, missing: str = "no such object or bucket") -> Iterator[None]:
    """Within the block, what the store raises becomes one line naming `url`."""
    try:
        yield
    except Exception as e:  # the store's own errors, from another library
        raise _error(str(url), e, missing) from None


def check_destination(url: str, overwrite: bool) -> None:
    """Refuse, before any work, an object that exists (without `overwrite`) or a store that
    cannot be reached."""
    fs, path = _filesystem(url)
    with errors(url, OUTPUT_MISSING):
        exists = fs.exists(path)
    if exists and not overwrite:
        raise UsageError(f"{url}: already exists (pass {option('overwrite', True)} to replace it)")


def upload(local: Path, url: str, done: Mapping[str, Callable[[], None]] | None = None) -> None:
    """Put the finished output `local` at `url`, each file as one object: a sharded
    output's shards beside it, a folder's files inside it. The JSON files that loaders
    open first (a manifest, an index, `config.json`) go last, once the rest is there.
    A file named in `done` is published by calling what it maps to (its upload's
    completion), not uploaded."""
    fs, _ = _filesystem(url)
    files = local.rglob("*") if local.is_dir() else local.parent.iterdir()  # shards beside
    order = sorted(files, key=lambda f: (f == local, f.suffix == ".json"))
    with errors(url, OUTPUT_MISSING):
        for f in order:
            if done and str(f) in done:
                done[str(f)]()
            elif f.is_file():
                fs.put_file(str(f), fs._strip_protocol(object_url(local, url, f)))


def object_url(local: Path, url: str, f: Path) -> str:
    """The URL that file `f` of the output `local` (in it, or a shard beside it) goes to,
    the output going to `url`."""
    if f == local:
        return url
    if f.is_relative_to(local):
        return f"{url.rstrip('/')}/{f.relative_to(local).as_posix()}"
    return f"{url.rsplit('/', 1)[0]}/{f.name}"


class RemoteFile:
    """One object of a store, read by byte ranges, never whole.

    `prefetch` starts fetching a range on a shared pool of threads, so that the fold finds
    it there (`read_into`) instead of waiting a round trip per read. Every fetch asks for
    the version first seen where the protocol can (S3's If-Match), and `check_unchanged`
    compares the object's ETag (or size and time) with it.
    """

    def __init__(self, path: Any) -> None:
        self.path = path
        with errors(path):
            self._fs = path.fs
            self._raw = self._fs.open(path.path, "rb", cache_type="none")
            self.size = self._raw.size
            self._version = _version(self._raw.details)
        self._reads: dict[tuple[int, int], _Request] = {}  # prefetched, by (offset, size)
        self._open: _Request | None = None  # the request that prefetches are merged into
        self._lock = threading.Lock()  # guards the prefetches' books
        self._blocks: BinaryIO | None = None  # for `_cached`, under its own lock
        self._blocks_lock = threading.Lock()
        self._skipped: list[tuple[int, int]] = []

    def _fetch(self, offset: int, size: int) -> bytes:
        with errors(self.path):
            data = self._raw._fetch_range(offset, offset + size)  # fsspec's stateless read
        if len(data) != size:
            raise OSError("unexpected end of file")
        return data

    def prefetch(self, offset: int, size: int, merge: int = 0) -> None:
        """Start fetching bytes [offset, offset+size), for a `read` soon after: in one
        request with the ranges prefetched just before it, while each starts at most HOLE
        bytes after the last and all fit in `merge` bytes (the request goes once full, or
        once a read needs it)."""
        with self._lock:
            if (offset, size) in self._reads:
                return
            run = self._open
            near = run is not None and run.end <= offset <= run.end + HOLE
            if run is not None and (not near or offset + size - run.start > merge):
                self._send()
                run = None
            if run is None:
                run = self._open = _Request(offset, offset)
            run.end = offset + size
            self._reads[offset, size] = run
            if run.end - run.start >= merge:
                self._send()

    def _send(self) -> None:
        """Start the request being merged (the lock is held)."""
        run, self._open = self._open, None
        run.data = _pool.submit(self._fetch, run.start, run.end - run.start)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            run = self._reads.pop((offset, size), None)
            if run is not None and run.data is None:
                self._send()
        if run is None and size < METADATA_BLOCK:  # metadata: through the block cache
            buf = bytearray(size)
            return bytes(buf[: self._cached(offset, memoryview(buf), skip=False)])
        if run is None:
            return self._fetch(offset, size)
        start = offset - run.start
        return run.data.result()[start : start + size]

    def read_into(self, offset: int, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.read(offset, out.nbytes), np.uint8)

    def handle(self) -> Window:
        """A file object for libraries that seek and read (h5py, zipfile)."""
        return self.window(0, self.size)

    def window(self, start: int, size: int) -> Window:
        """Bytes [start, start+size) as a file object (a `.keras` archive's member), for
        a library: `skip`ped ranges read as zeros."""
        return Window(functools.partial(self._cached, skip=True), start, size)

    def skip(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Let a library read byte ranges [start, end) as zeros, without fetching them:
        data about to be written over (the output's copy of the tensors averaged)."""
        self._skipped = sorted(ranges)

    def _cached(self, offset: int, buf: memoryview, *, skip: bool) -> int:
        """Read through a cache of small blocks, so that many small metadata reads cost
        a few requests; with `skip`, `skip`ped ranges read as zeros."""
        end, pos = offset + len(buf), offset
        with self._blocks_lock, errors(self.path):
            if self._blocks is None:
                self._blocks = self._fs.open(
                    self.path.path, "rb", block_size=METADATA_BLOCK, cache_type="blockcache"
                )
            for a, b in [*(self._skipped if skip else ()), (end, end)]:
                a, b = max(a, pos), min(b, end)
                if b < a:
                    continue
                if pos < a:
                    self._blocks.seek(pos)
                    got = self._blocks.readinto(buf[pos - offset : a - offset])
                    if got < a - pos:
                        return pos - offset + got
                buf[a - offset : b - offset] = bytes(b - a)
                pos = b
        return len(buf)

    def release(self) -> None:
        """Nothing to let go of: no file descriptor is held between reads."""

    def check_unchanged(self) -> None:
        with errors(self.path):
            self._fs.invalidate_cache(self.path.path)
            now = _version(self._fs.info(self.path.path))
        if now != self._version:
            raise StreamavgError(f"{self.path}: {CHANGED}")

    def close(self) -> None:
        with self._lock:
            for run in self._reads.values():
                if run.data is not None:
                    run.data.cancel()
            self._reads.clear()
        for f in (self._blocks, self._raw):
            if f is not None:
                f.close()


class _Request:
    """Adjacent prefetched ranges fetched as one: bytes [start, end), and their future."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.data: Future[bytes] | None = None  # None while prefetches still merge into it


def _version(info: dict) -> tuple:
    """What names one version of an object: its ETag where the store gives one."""
    etag = info.get("ETag") or info.get("etag")
    return (etag,) if etag else (info.get("size"), str(info.get("LastModified", info.get("mtime"))))
