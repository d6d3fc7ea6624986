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
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np

from .blocks import block_shape, blocks
from .casts import narrow, widen
from .choices import INTEGER_POLICIES
from .errors import StreamavgError, UsageError, option
from .formats import Reader, Tensor, open_checkpoint
from .progress import bytes_bar
from .remote import OPENERS, is_url

PIECE_BYTES = 2 << 20  # float64 accumulator per piece: in the CPU cache, and few enough
# pieces that Python and the GIL cost little between them (1 MiB: 10-25% slower in 16 bits)
BYTES_PER_ELEMENT = 28  # a worker's buffers: float64 sum and term, stored values (<= 8
# bytes), float32 widened values
MIN_MEMORY = 1 << 20  # the smallest --max-memory: below it, per-call overhead dominates
MIN_PIECE = 1 << 14  # elements; smaller pieces cost more in per-call overhead than they save
FD_RESERVE = 64  # file descriptors left for the interpreter, HDF5 and the output
WORKERS = min(8, os.cpu_count() or 1)  # reads and numpy release the GIL: one per core
READ_AHEAD = 256 << 20  # bytes of inputs fetched ahead of the fold (from object storage)
MERGE_MAX = 8 << 20  # bytes: the largest request that adjacent prefetches merge into

#: What to do with integer (and boolean) model tensors that differ between checkpoints.

Write = Callable[[Tensor, tuple[slice, ...], np.ndarray], None]
Buffers = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # f64, f64, bytes, f32


def open_all(paths: Sequence, stack: ExitStack) -> list[Reader]:
    """Open every checkpoint (metadata only), each checked against the newest as it comes.

    An older checkpoint whose model can be read straight from its file lets go of its
    HDF5 handle at once, so memory stays flat however many checkpoints there are; with
    more checkpoints than the open-file limit allows, it closes its file between reads.
    """
    newest = stack.enter_context(open_checkpoint(paths[-1]))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = len(paths) * newest.open_files
    too_many = soft != resource.RLIM_INFINITY and files > soft - FD_RESERVE
    opening = _opened_together if is_url(newest.path) else _opened_in_turn
    older = []
    for ck in opening(paths[:-1], newest, stack):
        check_matches(ck, newest)
        ck.settle(release=too_many)
        older.append(ck)
    return [*older, newest]


def _opened_in_turn(paths: Sequence, newest: Reader, stack: ExitStack) -> Iterator[Reader]:
    for path in paths:
        yield stack.enter_context(open_checkpoint(path, like=newest))


def _opened_together(paths: Sequence, newest: Reader, stack: ExitStack) -> Iterator[Reader]:
    """Open checkpoints in object storage on OPENERS threads, as each open waits on a few
    round trips; in order, the first failure is the one raised (the others are closed)."""
    with ThreadPoolExecutor(OPENERS) as pool:
        futures = [pool.submit(open_checkpoint, path, like=newest) for path in paths]
    for future in futures:
        if future.exception() is None:
            stack.enter_context(future.result())
    for future in futures:
        yield future.result()


def check_matches(ck: Reader, ref: Reader) -> None:
    """Require the format, model tensor names, shapes and dtypes of `ref`.

    A checkpoint whose loader matches tensors otherwise than by name is first matched to
    `ref` (a legacy `.h5` file layer by layer in order, see `Reader.match`), its tensors
    taking `ref`'s names.
    """
    if ck.format != ref.format:
        raise StreamavgError(
            f"{ck.path}: mixed formats: {ck.format} here, {ref.format} in {ref.path}"
        )
    ck.match(ref)
    want, have = model_tensors(ref), model_tensors(ck)
    for name in want.keys() - have.keys():
        raise StreamavgError(f"{ck.path}: {name}: missing (present in {ref.path})")
    for name in have.keys() - want.keys():
        raise StreamavgError(f"{ck.path}: {name}: not in {ref.path}")
    for name, t in have.items():
        r = want[name]
        if (t.shape, t.logical) != (r.shape, r.logical):
            raise StreamavgError(
                f"{ck.path}: {ck.stored_name(name)}: {_describe(t)} here, "
                f"{_describe(r)} in {ref.path}"
            )


def model_tensors(ck: Reader) -> dict[str, Tensor]:
    return {n: t for n, t in ck.tensors.items() if t.part == "model"}


def _describe(t: Tensor) -> str:
    return f"shape {t.shape} {t.logical}"


def piece_layout(max_memory: int | None) -> tuple[int, int]:
    """Worker threads and elements per piece whose buffers fit in `max_memory` bytes.

    Each worker holds a float64 sum, a float64 term, the stored values and their float32
    widening: 28 bytes an element at most. Without a budget, pieces are PIECE_BYTES of
    float64 on every core.
    """
    if max_memory is None:
        return WORKERS, PIECE_BYTES // 8
    workers = max(1, min(WORKERS, max_memory // (BYTES_PER_ELEMENT * MIN_PIECE)))
    return workers, max(1, min(PIECE_BYTES // 8, max_memory // (workers * BYTES_PER_ELEMENT)))


def to_average(
    checkpoints: Sequence[Reader], *, integers: str = "equal", max_memory: int | None = None
) -> list[Tensor]:
    """The newest checkpoint's model tensors to average; the others are copied from it.

    Floating-point tensors are averaged. Integer and boolean ones (counters, quantized
    kernels) cannot be: they are compared across the checkpoints, a block at a time, and
    copied if equal everywhere. One that differs is refused, or with `integers="newest"`
    its whole layer (see `Reader.layer`: a quantized kernel's float scale too) is copied
    from the newest checkpoint: no layer is ever half averaged.
    """
    if integers not in INTEGER_POLICIES:
        raise UsageError(f"{option('integers')} must be one of {', '.join(INTEGER_POLICIES)}")
    tensors = model_tensors(checkpoints[-1]).values()
    exact = [t for t in tensors if not t.averaged] if len(checkpoints) > 1 else []
    differing = _differing(checkpoints, exact, refuse=integers == "equal", max_memory=max_memory)
    newest = checkpoints[-1]
    taken = {newest.layer(name) for name in differing}
    return [t for t in tensors if t.averaged and newest.layer(t.name) not in taken]


def taken_whole(newest: Reader, averaged: Sequence[Tensor]) -> list[str]:
    """The layers that `to_average` left to be copied whole from `newest`
    although they hold float weights: those whose integers differ."""
    names = {t.name for t in averaged}
    floats = [t for t in model_tensors(newest).values() if t.averaged]
    return sorted({newest.layer(t.name) for t in floats if t.name not in names})


def _differing(
    checkpoints: Sequence[Reader],
    tensors: Sequence[Tensor],
    *,
    refuse: bool,
    max_memory: int | None,
) -> set[str]:
    """The names of `tensors` whose values are not the same in all `checkpoints`, compared
    a block at a time; with `refuse`, the first such tensor is an error instead."""
    newest, found = checkpoints[-1], set()
    whole = _read_whole(checkpoints, tensors)

    def piece(t: Tensor, index: tuple[slice, ...], buffers: Buffers) -> int:
        if t.name in found:
            return 0

        def values(ck: Reader) -> np.ndarray:
            if t.name in whole:  # each input decoded once
                return ck.read_whole(t.name)
            out = _block(buffers[1 if ck is newest else 2], t, index)
            ck.read(t.name, index, out)
            return out

        ours = values(newest)
        for ck in checkpoints[:-1]:
            if np.array_equal(ours, values(ck)):
                continue
            if refuse:
                raise StreamavgError(
                    f"{ck.path}: {ck.stored_name(t.name)}: {t.logical} values differ from "
                    f"{newest.path} (integer weights, such as quantized kernels, cannot be "
                    f"averaged; pass {option('integers', 'newest')} to take such layers from "
                    "the newest checkpoint)"
                )
            found.add(t.name)
            break
        return ours.nbytes * len(checkpoints)

    _each_piece(tensors, piece, max_memory, whole=whole)
    return found


def fold(
    checkpoints: Sequence[Reader],
    weights: np.ndarray,
    tensors: Sequence[Tensor],
    write: Write,
    *,
    max_memory: int | None = None,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> None:
    """Average `tensors` across `checkpoints` (oldest first) and hand each piece to `write`,
    which must copy it before returning: the buffer is reused for the next piece. Pieces
    are taken by a few threads at once (see `_each_piece`).
    """
    scale = weights.sum()
    total = sum(t.nbytes for t in tensors) * len(checkpoints)
    bar = bytes_bar(total, "averaging") if progress else None
    whole = _read_whole(checkpoints, tensors)

    def fold_in(i: int, x: np.ndarray, acc: np.ndarray, buffers: Buffers, t: Tensor) -> None:
        """acc (+)= weights[i] * x, in float64: an exact widening and product (integer
        weights), then the sum."""
        v, w = widen(x, t.logical, buffers[3]), weights[i]
        if i == 0:
            np.multiply(v, w, out=acc, dtype=np.float64)
        elif w == 1:
            np.add(acc, v, out=acc, dtype=np.float64)
        else:
            tmp = buffers[1][: acc.size].reshape(acc.shape)
            np.multiply(v, w, out=tmp, dtype=np.float64)
            np.add(acc, tmp, out=acc)

    def finish(
        t: Tensor, index: tuple[slice, ...], acc: np.ndarray, out: np.ndarray, buffers: Buffers
    ) -> None:
        """Divide the sum once, by the weights' sum, and round it once to the stored dtype."""
        if not allow_nonfinite and not np.isfinite(acc).all():
            _blame_nonfinite(checkpoints, t, index, np.empty_like(out))
        acc /= scale
        bits = buffers[1].view(np.uint32)  # the terms are folded in: scratch now
        narrow(acc, out, t.logical, buffers[3], bits, nan=allow_nonfinite)
        write(t, index, out)

    def piece(t: Tensor, index: tuple[slice, ...], buffers: Buffers) -> int:
        if t.name in whole:
            return fold_whole(t, buffers)
        buf = _block(buffers[2], t, index)
        acc = buffers[0][: buf.size].reshape(buf.shape)
        for i, ck in enumerate(checkpoints):
            ck.read(t.name, index, buf)
            fold_in(i, buf, acc, buffers, t)
        finish(t, index, acc, buf, buffers)  # the inputs are folded in: their buffer takes it
        return buf.nbytes * len(checkpoints)

    def fold_whole(t: Tensor, buffers: Buffers) -> int:
        """Tensor `t` read whole from each checkpoint in turn, folded a piece at a time into
        a float64 sum of its size: the same arithmetic, each input decoded once."""
        acc = np.empty(t.shape)
        for i, ck in enumerate(checkpoints):
            x = ck.read_whole(t.name).view(t.stored)
            for index in blocks(t.shape, buffers[1].size):
                fold_in(i, x[index], acc[index], buffers, t)
        finish(t, (), acc, x, buffers)
        return t.nbytes * len(checkpoints)

    # Each input is read about READ_AHEAD / n bytes ahead; a store merges adjacent blocks
    # into requests of up to half that, so that one is in flight while the other is read.
    merge = min(MERGE_MAX, READ_AHEAD // (2 * len(checkpoints)))

    def prefetch(t: Tensor, index: tuple[slice, ...]) -> None:
        for ck in checkpoints:
            ck.prefetch(t.name, index, merge)

    piece_bytes = piece_layout(max_memory)[1] * 8 * len(checkpoints)  # all inputs, at most
    remote = any(is_url(ck.path) for ck in checkpoints)  # a disk reads ahead by itself
    ahead = (prefetch, max(1, READ_AHEAD // piece_bytes)) if remote else None
    try:
        _each_piece(tensors, piece, max_memory, bar, whole=whole, ahead=ahead)
    finally:
        if bar is not None:
            bar.close()
    for ck in checkpoints:
        ck.check_unchanged()


def _read_whole(checkpoints: Sequence[Reader], tensors: Sequence[Tensor]) -> set[str]:
    """The tensors that some checkpoint decodes whole for any read: read once, whole."""
    return {t.name for t in tensors if any(ck.whole_reads(t.name) for ck in checkpoints)}


def _block(buffer: np.ndarray, t: Tensor, index: tuple[slice, ...]) -> np.ndarray:
    """The start of a worker's `buffer`, as block `index` of `t` in its stored dtype."""
    shape = block_shape(t.shape, index)
    size = math.prod(shape) * t.stored.itemsize
    return buffer.view(np.uint8)[:size].view(t.stored).reshape(shape)


def _each_piece(
    tensors: Sequence[Tensor],
    piece: Callable[[Tensor, tuple[slice, ...], Buffers], int],
    max_memory: int | None,
    bar=None,
    *,
    whole: Collection[str] = (),
    ahead: tuple[Callable[[Tensor, tuple[slice, ...]], None], int] | None = None,
) -> None:
    """Call `piece(t, index, buffers)` on every block of every tensor (once, with index
    `()`, for the tensors named in `whole`); it returns the bytes it read, for the
    progress `bar`. With `ahead` (`prefetch`, `depth`), `prefetch(t, index)` is called
    on the next `depth` blocks, so that inputs in object storage arrive before they are
    needed.

    Pieces are independent, so a few threads take them in turn (reads and numpy release the
    GIL), each with its own buffers: memory depends on neither the model's size nor the
    number of checkpoints. The first failing piece, in order, is the error raised; a signal
    stops new pieces, waits for every worker, then is raised.
    """
    workers, elements = piece_layout(max_memory)
    jobs = enumerate(
        (t, index)
        for t in tensors
        for index in ([()] if t.name in whole else blocks(t.shape, elements))
    )
    prefetch, depth = ahead or (None, 0)
    fetched: deque = deque()  # jobs prefetched, not yet taken

    def take() -> tuple[int, tuple[Tensor, tuple[slice, ...]]] | None:
        while len(fetched) <= depth and (job := next(jobs, None)) is not None:
            if prefetch is not None and job[1][0].name not in whole:
                prefetch(*job[1])
            fetched.append(job)
        return fetched.popleft() if fetched else None

    lock = threading.Lock()  # guards `jobs` and the progress bar
    stop = threading.Event()  # set on the first error or signal: no new pieces start
    errors: dict[int, BaseException] = {}  # by piece number

    def worker() -> None:
        number = -1
        try:
            buffers = (
                np.empty(elements),
                np.empty(elements),
                np.empty(elements * 8, np.uint8),
                np.empty(elements, np.float32),
            )
            done = 0
            while True:
                with lock:
                    if bar is not None:
                        bar.update(done)
                    job = None if stop.is_set() else take()
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
    if signalled is not None:
        raise signalled
    if errors:
        raise errors[min(errors)]


def _blame_nonfinite(
    checkpoints: Sequence[Reader], t: Tensor, index: tuple[slice, ...], buf: np.ndarray
) -> None:
    for ck in checkpoints:
        ck.read(t.name, index, buf)
        if not np.isfinite(buf.view(t.dtype)).all():
            raise StreamavgError(
                f"{ck.path}: {ck.stored_name(t.name)}: contains NaN or Inf "
                f"(pass {option('allow_nonfinite', True)} to average anyway)"
            )
    raise StreamavgError(f"{checkpoints[-1].path}: {t.name}: weighted sum overflowed")
