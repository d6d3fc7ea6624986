"""The fold on a Dask cluster: tasks named `streamavg-fold-...`, each folding a group of
tensors. Workers open the inputs themselves (shared paths, or URLs) and write their
results themselves, so the client never handles tensor data: into the output's temporary
files at the tensors' offsets (each shard of a sharded output is a file of its own), or,
for an output in S3, as the parts of multipart uploads (see `Sending`), so that workers
and client share nothing but the store. The client publishes the output once every task
is done.

>>> from distributed import Client  # doctest: +SKIP
>>> client = Client("tcp://10.0.0.5:8786")  # doctest: +SKIP
>>> streamavg.average(["ckpts/"], scheme="linear", client=client)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import engine, multipart, publish, remote
from .blocks import flat_start
from .errors import StreamavgError, UsageError, command_line, on_command_line
from .formats import Tensor
from .formats.base import Targets
from .progress import bytes_bar
from .publish import OffsetWriter

TASK_BYTES = 64 << 20  # a task folds about this many bytes of each checkpoint, at least
SHARED = "the workers must share the client's filesystem for local paths"

Places = dict[str, tuple[str, int]]  # by tensor name: the output file and the data's offset
Sums = dict[int, tuple[int, int]]  # by offset: the size and CRC-32 of a range written


class Fold(NamedTuple):
    """What every task of one run folds with: the inputs, their weights, the options."""

    files: list[str]
    weights: np.ndarray
    allow_nonfinite: bool
    flags: bool  # whether errors name options as a command line does


def distributed_client() -> type:
    """Dask's `Client` class; one line if Dask is not installed."""
    try:
        from distributed import Client
    except ImportError:
        name = "--scheduler" if on_command_line() else "client"
        raise UsageError(f"{name} needs Dask: pip install 'streamavg[dask]'") from None
    return Client


def dask_client(address: str):
    """A Dask client of the scheduler at `address`; one line if Dask is not installed."""
    Client = distributed_client()
    try:
        return Client(address)
    except OSError as e:  # nothing listening, or not a scheduler
        raise StreamavgError(f"{address}: cannot reach the Dask scheduler ({e})") from None


def groups(tensors: Sequence[Tensor], workers: int) -> list[list[Tensor]]:
    """`tensors` in groups of similar size, a few per worker, at least TASK_BYTES each."""
    total = sum(t.nbytes for t in tensors)
    size = max(TASK_BYTES, total // max(1, 4 * workers))
    out: list[list[Tensor]] = [[]]
    filled = 0
    for t in tensors:
        if out[-1] and filled + t.nbytes > size:
            out.append([])
            filled = 0
        out[-1].append(t)
        filled += t.nbytes
    return [g for g in out if g]


def fold_on(
    client,
    files: Sequence[Path],
    weights: np.ndarray,
    tensors: Sequence[Tensor],
    targets: Targets | None,
    *,
    sending: Sending | None = None,
    allow_nonfinite: bool,
    progress: bool,
) -> Fold:
    """Fold `tensors` of `files` into the output `targets` describe, as Dask tasks: into
    its local files, or with `sending`, into its objects in the store; what the tasks
    folded with."""
    distributed_client()  # one line if Dask is missing, whatever `client` is
    if targets is None:
        raise UsageError(
            "the Dask fold cannot write an Orbax checkpoint: TensorStore compresses each "
            "array into one chunk, which has no fixed place in a file for a worker to "
            "write; average Orbax checkpoints in one process"
        )
    if not {t.name for t in tensors} <= targets.places.keys():
        raise UsageError(
            "the Dask fold cannot write this output: its datasets are chunked (as h5py "
            "may write them, Keras never does), with no fixed place in the file for a "
            "worker to write"
        )
    inputs = [str(remote.absolute(f)) for f in files]  # not each worker's own directory
    places = {name: (os.path.abspath(path), at) for name, (path, at) in targets.places.items()}
    written = [] if sending is not None else sorted({path for path, _ in places.values()})
    check = client.submit(_unseen, inputs, written, key=f"streamavg-check-{uuid.uuid4().hex}")
    if (why := check.result()) is not None:
        raise StreamavgError(why)
    fold = Fold(inputs, weights, allow_nonfinite, on_command_line())
    checksummed = targets.checksums is not None
    if sending is not None:
        tasks = sending.start(places, tensors, checksummed)
    else:
        tasks = [
            (_fold_group, group, ({t.name: places[t.name] for t in group}, checksummed))
            for group in groups(tensors, len(client.scheduler_info()["workers"]))
        ]
    for sums in run_tasks(client, fold, tasks, progress):
        if sending is not None:
            sums = sending.record(sums)
        if sums:
            targets.checksums.update(sums)
    return fold


def run_tasks(
    client, fold: Fold, tasks: Sequence[tuple[Callable, list[Tensor], tuple]], progress: bool
) -> Iterator[Any]:
    """Run each task `(function, tensors, arguments)` on the cluster as
    `function(fold, tensors, *arguments)`; yield their results as they come. A task's
    error is raised here, as a local fold would raise it, and the others are cancelled."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(task, fold, tensors, *args, key=f"streamavg-fold-{run}-{i}", pure=False)
        for i, (task, tensors, args) in enumerate(tasks)
    ]
    sizes = {
        f.key: sum(t.nbytes for t in task[1]) * len(fold.files)
        for f, task in zip(futures, tasks, strict=True)
    }
    bar = bytes_bar(sum(sizes.values()), "averaging") if progress else None
    try:
        for future in as_completed(futures):
            yield future.result()
            if bar is not None:
                bar.update(sizes[future.key])
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close()


class Sending:
    """An output in S3 that the workers upload themselves: each output file that holds
    averaged tensors as a multipart upload (see `streamavg.multipart`), the other files
    by the client. The client's local copy (`local`) has the layout and every byte but
    the averaged data. For a `.keras` archive (`checksummed`), the parts that finishing
    it changes (the zip header in the first, the members after the weights in the last)
    are folded once for their CRC-32 and again, to be sent, by `finish`. The first part
    of every file, whose header its writer may change as it closes (HDF5's open flag),
    is sent by `finish` too. Leaving the block unfinished (an error, a signal) aborts
    every upload: nothing is left.
    """

    def __init__(self, local: Path, url: str) -> None:
        self.local, self.url = local, url
        self._uploads: dict[str, multipart.Upload] = {}  # by local file
        self._etags: dict[str, dict[int, str]] = {}  # by upload id, then part number
        self._spans: dict[str, list[tuple[int, int]]] = {}  # by local file
        self._final: dict[str, Path] = {}  # the local files' names once published
        self._kept: list[tuple[multipart.Job, bool, list[Tensor], Places]] = []  # last?
        self._sent: dict[tuple[str, int, int], bytes] = {}  # the client's bytes, digested
        self._done = False

    def __enter__(self) -> Sending:
        return self

    def __exit__(self, *_) -> None:
        if not self._done:
            for upload in self._uploads.values():
                with suppress(StreamavgError):
                    multipart.abort(upload)

    def start(self, places: Places, tensors: Sequence[Tensor], checksummed: bool) -> list:
        """Start an upload per output file of `places`, cut each into parts, and return
        the tasks that fold `tensors` into them (see `run_tasks`)."""
        found: dict[str, list[tuple[int, int, Tensor]]] = {}
        for t in tensors:
            path, at = places[t.name]
            found.setdefault(path, []).append((at, at + t.nbytes, t))
        tasks = []
        for path, spanned in sorted(found.items()):
            spanned.sort(key=lambda s: s[0])
            spans = self._spans[path] = [(a, b) for a, b, _ in spanned]
            self._final[path] = publish.published(Path(path))  # once the writer is done
            url = remote.object_url(self.local, self.url, self._final[path])
            upload = self._uploads[path] = multipart.start(url)
            self._etags[upload.id] = {}
            parts = multipart.cut(os.path.getsize(path), spans)
            numbers = {part: k for k, part in enumerate(parts, 1)}
            kept = {parts[0], parts[-1]} if checksummed else {parts[0]}
            for a, b in kept:
                within = [t for s, e, t in spanned if s < b and e > a]
                job = multipart.Job(path, upload, numbers[a, b], a, b, ())
                mine = {t.name: places[t.name] for t in within}
                self._kept.append((job, (a, b) == parts[-1], within, mine))
            for run in multipart.runs(parts, spans, TASK_BYTES):
                jobs = [self._job(path, numbers[p], *p, sent=True) for p in run if p not in kept]
                sent = [(j.start, j.end) for j in jobs] if not checksummed else run
                group = [t for a, b, t in spanned if any(a < e and b > s for s, e in sent)]
                mine = {t.name: places[t.name] for t in group}
                if group or jobs:
                    tasks.append((_fold_parts, group, (mine, jobs, checksummed)))
        return tasks

    def record(self, result: tuple[Sums | None, dict[str, dict[int, str]]]) -> Sums | None:
        """Keep a task's parts' ETags; its checksums."""
        sums, etags = result
        for upload, tags in etags.items():
            self._etags[upload].update(tags)
        return sums

    def finish(self, client, fold: Fold, progress: bool) -> None:
        """Once the local copy is finished: fold and send the parts kept for now, check
        that the parts sent before had their final bytes, and publish every object (the
        JSON files that loaders open first, last)."""
        tasks = []
        for job, last, within, mine in self._kept:
            end = os.path.getsize(self._final[job.path]) if last else job.end  # and after
            again = self._job(job.path, job.number, job.start, end, sent=False)
            tasks.append((_fold_parts, within, (mine, [again], False)))
        for result in run_tasks(client, fold, tasks, progress):
            self.record(result)
        for (path, start, end), digest in self._sent.items():
            if _digest(self._gaps(path, start, end, self._final[path])) != digest:
                raise StreamavgError(f"{self.url}: the output changed after parts were sent")
        done = {
            str(self._final[path]): functools.partial(
                multipart.complete, upload, self._etags[upload.id]
            )
            for path, upload in self._uploads.items()
        }
        remote.upload(self.local, self.url, done)
        self._done = True

    def _job(self, path: str, number: int, start: int, end: int, *, sent: bool) -> multipart.Job:
        """Part `number`, bytes [start, end) of `path`, with the client's bytes in it; if
        `sent` before the local copy is finished, their digest is kept for `finish`."""
        gaps = self._gaps(path, start, end, Path(path) if sent else self._final[path])
        if sent:
            self._sent[path, start, end] = _digest(gaps)
        return multipart.Job(path, self._uploads[path], number, start, end, gaps)

    def _gaps(self, path: str, start: int, end: int, now: Path) -> tuple[tuple[int, bytes], ...]:
        """The client's bytes in [start, end) of output file `path`, read from where it
        is `now`: all but the averaged data."""
        out, at = [], start
        with open(now, "rb") as f:
            for a, b in [*self._spans[path], (end, end)]:
                a, b = min(max(a, start), end), min(b, end)
                if at < a:
                    out.append((at, os.pread(f.fileno(), a - at, at)))
                at = max(at, b)
        return tuple(out)


def _digest(gaps: tuple[tuple[int, bytes], ...]) -> bytes:
    h = hashlib.blake2b()
    for at, data in gaps:
        h.update(at.to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def _unseen(inputs: list[str], outputs: list[str]) -> str | None:
    """On a worker: what it cannot see of the client's local inputs and temporary output
    files, in one line, or None."""
    for path in inputs:
        if not remote.is_url(path) and not os.path.exists(path):
            return f"{path}: a worker cannot see this input; {SHARED}"
    for path in outputs:
        if not os.access(path, os.W_OK):
            return f"{path}: a worker cannot write the output's temporary file; {SHARED}"
    return None


def _fold_group(fold: Fold, tensors: list[Tensor], places: Places, checksummed: bool):
    """One task, on a worker: fold `tensors` and write each at its place (file, offset);
    the CRC-32 of each range written, if `checksummed` (one file: a `.keras` archive)."""
    sums: Sums | None = {} if checksummed else None
    with ExitStack() as stack:
        writers = {}
        for path in {path for path, _ in places.values()}:
            try:
                writers[path] = OffsetWriter(Path(path), sums)
            except OSError as e:
                raise StreamavgError(
                    f"{path}: a worker cannot write the output's temporary file "
                    f"({e.strerror}); {SHARED}"
                ) from None
            stack.callback(writers[path].close)

        def write(t: Tensor, index: tuple[slice, ...], values: np.ndarray) -> None:
            path, offset = places[t.name]
            writers[path].write_block(offset, t.shape, index, values)

        _fold(fold, tensors, write, stack)
    return sums


def _fold_parts(
    fold: Fold,
    tensors: list[Tensor],
    places: Places,
    jobs: list[multipart.Job],
    checksummed: bool,
) -> tuple[Sums | None, dict[str, dict[int, str]]]:
    """One task, on a worker: fold `tensors` into the parts `jobs` and send them; the
    CRC-32 of each range of data, if `checksummed`, and the parts' ETags by upload."""
    sums: Sums | None = {} if checksummed else None
    parts = multipart.PartWriter(jobs)

    def write(t: Tensor, index: tuple[slice, ...], values: np.ndarray) -> None:
        path, offset = places[t.name]
        data = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        at = offset + flat_start(t.shape, index) * values.itemsize
        if sums is not None:
            sums[at] = len(data), zlib.crc32(data)
        parts.write(path, at, data)

    with ExitStack() as stack:
        _fold(fold, tensors, write, stack)
    etags: dict[str, dict[int, str]] = {}
    for (upload, number), etag in parts.close().items():
        etags.setdefault(upload, {})[number] = etag
    return sums, etags


def _fold(fold: Fold, tensors: list[Tensor], write: engine.Write, stack: ExitStack) -> None:
    """Open the inputs on this worker and fold `tensors` into `write`."""
    if fold.flags:
        stack.enter_context(command_line())
    checkpoints = engine.open_all(fold.files, stack)
    engine.fold(checkpoints, fold.weights, tensors, write, allow_nonfinite=fold.allow_nonfinite)
