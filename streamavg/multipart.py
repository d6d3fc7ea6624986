"""An object in S3 written in parts by many processes: a multipart upload that the client
creates and completes, each part sent by the Dask task that computed its bytes, so that
workers share nothing with the client but the store, and the object appears whole or not
at all (an upload that is aborted leaves nothing, not even its parts).

Parts are cut before any task runs, at the edges of the tensors' data, so that each
tensor lies in one part (or, larger than a part may be, in consecutive parts that one task
sends). `cut` is pure arithmetic; the rest are thin calls to S3 through s3fs.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

from .errors import StreamavgError
from .remote import errors

MIN_PART = 5 << 20  # S3: the smallest part, but for the last
MAX_PART = 5 << 30  # S3: the largest part
MAX_PARTS = 10_000  # S3: parts of one upload, at most
PART_BYTES = 16 << 20  # the part size aimed at: a few per task, little memory each
PROTOCOLS = ("s3", "s3a")


class Upload(NamedTuple):
    """A multipart upload in progress: the object's URL and the store's id for it."""

    url: str
    id: str


class Job(NamedTuple):
    """Part `number` of `upload`: bytes [start, end) of the output file `path` (as the
    client's layout names it), of which `gaps` (offset, bytes) are the client's (headers,
    tensors not averaged) and the rest the averaged tensors' data."""

    path: str
    upload: Upload
    number: int
    start: int
    end: int
    gaps: tuple[tuple[int, bytes], ...]


class PartWriter:
    """On a worker: assembles the parts of `jobs` from the averaged tensors' data as the
    fold writes it, each sent as soon as it is whole; a part lives in memory only while
    it fills. Data outside the parts is left out (a tensor wider than the parts)."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._jobs = sorted(jobs, key=lambda j: (j.path, j.start))
        self._keys = [(j.path, j.start) for j in self._jobs]
        self._missing = {j: j.end - j.start - sum(len(g) for _, g in j.gaps) for j in jobs}
        self._buffers: dict[Job, bytearray] = {}
        self._lock = threading.Lock()
        self.etags: dict[tuple[str, int], str] = {}  # by upload id and part number

    def write(self, path: str, at: int, data: memoryview) -> None:
        """Bytes `data` of output file `path`, from offset `at`."""
        k = max(0, bisect.bisect_right(self._keys, (path, at)) - 1)
        for job in self._jobs[k:]:
            if (job.path, job.start) >= (path, at + len(data)):
                break
            lo, hi = max(at, job.start), min(at + len(data), job.end)
            if job.path != path or lo >= hi:
                continue
            with self._lock:
                buf = self._buffers.get(job) or self._buffers.setdefault(job, _filled(job))
                buf[lo - job.start : hi - job.start] = data[lo - at : hi - at]
                self._missing[job] -= hi - lo
                whole = self._missing[job] == 0
            if whole:
                self._send(job)

    def close(self) -> dict[tuple[str, int], str]:
        """Send the parts that hold no averaged data; the ETags of all, by upload id and
        part number."""
        for job, missing in list(self._missing.items()):
            if missing == 0 and (job.upload.id, job.number) not in self.etags:
                self._send(job)
            elif missing:
                raise StreamavgError(
                    f"{job.upload.url}: part {job.number}: {missing} bytes never written (a bug)"
                )
        return self.etags

    def _send(self, job: Job) -> None:
        with self._lock:
            buf = self._buffers.pop(job, None) or _filled(job)
        self.etags[job.upload.id, job.number] = send(job.upload, job.number, buf)


def _filled(job: Job) -> bytearray:
    """A part's buffer, with the client's bytes in place."""
    buf = bytearray(job.end - job.start)
    for at, data in job.gaps:
        buf[at - job.start : at - job.start + len(data)] = data
    return buf


def supported(url: str) -> bool:
    """Whether the store at `url` takes parts from many writers (S3's multipart uploads)."""
    return url.split("://", 1)[0].lower() in PROTOCOLS


def cut(size: int, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Bytes [0, size) as parts [start, end) for an upload: every part but the last of
    PART_BYTES to twice that (more for objects over 80 GB, so that there are at most
    MAX_PARTS), ending where no span [start, end) of `spans` (the tensors' data) is cut,
    unless the span is larger than a part.

    >>> [(a >> 20, b >> 20) for a, b in cut(40 << 20, [(0, 20 << 20), (20 << 20, 40 << 20)])]
    [(0, 20), (20, 40)]
    """
    target = max(PART_BYTES, -(-size // (MAX_PARTS // 2 - 1)))
    parts, start = [], 0
    while start < size:
        end = size if size - start <= 2 * target else start + target
        span = inside(spans, end)
        if span is not None and span[1] <= start + 2 * target:
            end = span[1]  # the tensor whole
        elif span is not None and span[0] - start >= target // 2:
            end = span[0]  # before a tensor larger than a part, which parts of its own cut
        parts.append((start, end))
        start = end
    return parts


def runs(parts: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], least: int):
    """`parts` (see `cut`) grouped into runs of at least `least` bytes (the last may have
    fewer), each ending where no span is cut: a run's spans are whole, for one task."""
    out: list[list[tuple[int, int]]] = [[]]
    for part in parts:
        out[-1].append(part)
        if part[1] - out[-1][0][0] >= least and inside(spans, part[1]) is None:
            out.append([])
    return [run for run in out if run]


def inside(spans: Sequence[tuple[int, int]], at: int) -> tuple[int, int] | None:
    """The span of `spans` (sorted, disjoint) that offset `at` falls strictly inside."""
    k = bisect.bisect_right(spans, (at, math.inf)) - 1
    return spans[k] if k >= 0 and spans[k][0] < at < spans[k][1] else None


def _s3(url: str):
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    bucket, key, _ = fs.split_path(path)
    return fs, {"Bucket": bucket, "Key": key}


def start(url: str) -> Upload:
    """Create a multipart upload for the object at `url`."""
    with errors(url):
        fs, where = _s3(url)
        return Upload(url, fs.call_s3("create_multipart_upload", **where)["UploadId"])


def send(upload: Upload, number: int, data: bytes | memoryview) -> str:
    """Upload part `number` (from 1) of `upload`; its ETag. Sending a part again replaces
    it (a task run twice, its worker lost)."""
    with errors(upload.url):
        fs, where = _s3(upload.url)
        answer = fs.call_s3(
            "upload_part", **where, UploadId=upload.id, PartNumber=number, Body=bytes(data)
        )
    return answer["ETag"]


def complete(upload: Upload, etags: dict[int, str]) -> None:
    """Make the object of `upload` from its parts, in order: it appears only now."""
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
    with errors(upload.url):
        fs, where = _s3(upload.url)
        fs.call_s3(
            "complete_multipart_upload",
            **where,
            UploadId=upload.id,
            MultipartUpload={"Parts": parts},
        )
        fs.invalidate_cache(upload.url)


def abort(upload: Upload) -> None:
    """Discard `upload` and every part sent for it."""
    with errors(upload.url):
        fs, where = _s3(upload.url)
        fs.call_s3("abort_multipart_upload", **where, UploadId=upload.id)
