"""The one streaming fold: weighted sums of every tensor, a cache-sized piece at a time.

For each piece of each averaged tensor, the same rows are read from every checkpoint,
folded into a small float64 accumulator in chronological order, divided by the sum
of the weights and cast back to the stored dtype. That is exactly the arithmetic of
``np.average(stack, axis=0, weights=w)`` in float64, so memory stays flat in the
number of checkpoints while the result matches the in-memory reference.
"""

from __future__ import annotations

import contextvars
import math
import os
import resource
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import numpy as np

from .blocks import block_shape, blocks
from .errors import StreamavgError, option
from .formats import Checkpoint, Tensor
from .progress import bytes_bar

PIECE_BYTES = 1 << 20  # float64 accumulator per piece: stays in the CPU cache
BYTES_PER_ELEMENT = 24  # a worker's buffers: float64 sum and term, stored values (<= 8 bytes)
MIN_MEMORY = 1 << 20  # the smallest --max-memory: below it, per-call overhead dominates
MIN_PIECE = 1 << 14  # elements; smaller pieces cost more in per-call overhead than they save
FD_RESERVE = 64  # file descriptors left for the interpreter, HDF5 and the output
WORKERS = min(8, os.cpu_count() or 1)  # reads and numpy release the GIL: one per core

Write = Callable[[Tensor, tuple[slice, ...], np.ndarray], None]


def open_all(paths: Sequence, stack: ExitStack) -> list[Checkpoint]:
    """Open every checkpoint (metadata only), each checked against the newest as it comes.

    An older checkpoint whose model can be read straight from its file lets go of its
    HDF5 handle at once, so memory stays flat however many checkpoints there are; with
    more checkpoints than the open-file limit allows, it closes its file between reads.
    """
    newest = stack.enter_context(Checkpoint(paths[-1]))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    too_many = soft != resource.RLIM_INFINITY and len(paths) > soft - FD_RESERVE
    older = []
    for path in paths[:-1]:
        ck = stack.enter_context(Checkpoint(path))
        check_matches(ck, newest)
        ck.drop_hdf5()
        if too_many:
            ck.release()
        older.append(ck)
    return [*older, newest]


def check_matches(ck: Checkpoint, ref: Checkpoint) -> None:
    """Require the format, model tensor names, shapes and dtypes of `ref`."""
    if ck.format != ref.format:
        raise StreamavgError(
            f"{ck.path}: mixed formats: {ck.format} here, {ref.format} in {ref.path}"
        )
    want, have = model_tensors(ref), model_tensors(ck)
    for name in want.keys() - have.keys():
        raise StreamavgError(f"{ck.path}: {name}: missing (present in {ref.path})")
    for name in have.keys() - want.keys():
        raise StreamavgError(f"{ck.path}: {name}: not in {ref.path}")
    for name, t in have.items():
        r = want[name]
        if (t.shape, t.dtype) != (r.shape, r.dtype):
            raise StreamavgError(
                f"{ck.path}: {name}: {_describe(t)} here, {_describe(r)} in {ref.path}"
            )


def model_tensors(ck: Checkpoint) -> dict[str, Tensor]:
    return {n: t for n, t in ck.tensors.items() if t.part == "model"}


def _describe(t: Tensor) -> str:
    return f"shape {t.shape} {t.dtype}"


def piece_layout(max_memory: int | None) -> tuple[int, int]:
    """Worker threads and elements per piece whose buffers fit in `max_memory` bytes.

    Each worker holds a float64 sum, a float64 term and the stored values: 24 bytes an
    element at most. Without a budget, pieces are PIECE_BYTES of float64 on every core.
    """
    if max_memory is None:
        return WORKERS, PIECE_BYTES // 8
    workers = max(1, min(WORKERS, max_memory // (BYTES_PER_ELEMENT * MIN_PIECE)))
    return workers, max(1, min(PIECE_BYTES // 8, max_memory // (workers * BYTES_PER_ELEMENT)))


def fold(
    checkpoints: Sequence[Checkpoint],
    weights: np.ndarray,
    tensors: Sequence[Tensor],
    write: Write,
    *,
    max_memory: int | None = None,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> None:
    """Average `tensors` across `checkpoints` (oldest first) and hand each piece to `write`,
    which must copy it before returning: the buffer is reused for the next piece.

    Pieces are independent, so a few threads take them in turn (reads and numpy release the
    GIL), each with its own buffers: memory depends on neither the model's size nor the
    number of checkpoints. The first failing piece, in order, is the error raised.
    """
    scale = weights.sum()
    workers, elements = piece_layout(max_memory)
    jobs = enumerate((t, index) for t in tensors for index in blocks(t.shape, elements))
    lock = threading.Lock()  # guards `jobs` and the progress bar
    stop = threading.Event()  # set on the first error or signal: no new pieces start
    errors: dict[int, BaseException] = {}  # by piece number
    total = sum(t.nbytes for t in tensors) * len(checkpoints)
    bar = bytes_bar(total, "averaging") if progress else None

    def piece(t: Tensor, index: tuple[slice, ...], buffers: tuple[np.ndarray, ...]) -> int:
        shape = block_shape(t.shape, index)
        size = math.prod(shape)
        sums, terms, raw = buffers
        buf = raw[: size * t.stored.itemsize].view(t.stored).reshape(shape)
        acc, tmp = sums[:size].reshape(shape), terms[:size].reshape(shape)
        for i, ck in enumerate(checkpoints):
            ck.read(t.name, index, buf)
            term = acc if i == 0 else tmp
            np.copyto(term, buf.view(t.dtype))  # exact widening to float64
            term *= weights[i]
            if i:
                acc += tmp
        if not allow_nonfinite and not np.isfinite(acc).all():
            _blame_nonfinite(checkpoints, t, index, buf)
        acc /= scale
        out = buf.view(t.dtype)  # the inputs are folded in: reuse their buffer for the result
        np.copyto(out, acc, casting="unsafe")
        write(t, index, out)
        return buf.nbytes * len(checkpoints)

    def worker() -> None:
        number = -1
        try:
            buffers = np.empty(elements), np.empty(elements), np.empty(elements * 8, np.uint8)
            done = 0
            while True:
                with lock:
                    if bar is not None:
                        bar.update(done)
                    job = None if stop.is_set() else next(jobs, None)
                if job is None:
                    return
                number, (t, index) = job
                done = piece(t, index, buffers)
        except BaseException as e:
            errors[number] = e
            stop.set()

    context = contextvars.copy_context()  # how errors name options, in every worker
    threads = [
        threading.Thread(target=context.copy().run, args=(worker,), name=f"streamavg-{i}")
        for i in range(workers)
    ]
    signalled = None  # SIGINT or SIGTERM raised in this thread: stop, wait, then re-raise
    try:
        for thread in threads:
            thread.start()
    except BaseException as e:
        signalled = e
        stop.set()
    for thread in threads:  # a thread not yet marked started has not taken a piece either
        while thread.is_alive():
            try:
                thread.join()
            except BaseException as e:
                signalled = signalled or e
                stop.set()
    if bar is not None:
        bar.close()
    if signalled is not None:
        raise signalled
    if errors:
        raise errors[min(errors)]
    for ck in checkpoints:
        ck.check_unchanged()


def _blame_nonfinite(
    checkpoints: Sequence[Checkpoint], t: Tensor, index: tuple[slice, ...], buf: np.ndarray
) -> None:
    for ck in checkpoints:
        ck.read(t.name, index, buf)
        if not np.isfinite(buf.view(t.dtype)).all():
            raise StreamavgError(
                f"{ck.path}: {t.name}: contains NaN or Inf "
                f"(pass {option('allow_nonfinite', True)} to average anyway)"
            )
    raise StreamavgError(f"{checkpoints[-1].path}: {t.name}: weighted sum overflowed")
