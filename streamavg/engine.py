"""The one streaming fold: weighted sums of every tensor, a cache-sized piece at a time.

For each piece of each averaged tensor, the same rows are read from every checkpoint,
folded into a small float64 accumulator in chronological order, divided by the sum
of the weights and cast back to the stored dtype. That is exactly the arithmetic of
``np.average(stack, axis=0, weights=w)`` in float64, so memory stays flat in the
number of checkpoints while the result matches the in-memory reference.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np

from .errors import StreamavgError
from .formats import Checkpoint, Tensor

PIECE_BYTES = 1 << 20  # float64 accumulator per piece: stays in the CPU cache
WORKERS = min(8, os.cpu_count() or 1)  # reads and numpy release the GIL: one per core

Write = Callable[[Tensor, "slice | tuple", np.ndarray], None]


def open_all(paths: Sequence, stack: ExitStack) -> list[Checkpoint]:
    """Open every checkpoint (metadata only), each checked against the newest as it comes.

    An older checkpoint whose model can be read straight from its file lets go of its
    HDF5 handle at once, so memory stays flat however many checkpoints there are.
    """
    newest = stack.enter_context(Checkpoint(paths[-1]))
    older = []
    for path in paths[:-1]:
        ck = stack.enter_context(Checkpoint(path))
        check_matches(ck, newest)
        ck.drop_hdf5()
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


def pieces(shape: tuple[int, ...]) -> Iterator[slice | tuple]:
    """Row slices of a tensor whose float64 size is about PIECE_BYTES (at least one row)."""
    if not shape:
        yield ()
        return
    row = int(np.prod(shape[1:], dtype=np.int64)) * 8
    step = max(1, PIECE_BYTES // max(row, 1))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _shape(t: Tensor, rows: slice | tuple) -> tuple[int, ...]:
    """The shape of `rows` of tensor `t`."""
    return () if rows == () else (rows.stop - rows.start, *t.shape[1:])


def fold(
    checkpoints: Sequence[Checkpoint],
    weights: np.ndarray,
    tensors: Sequence[Tensor],
    write: Write,
    *,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> None:
    """Average `tensors` across `checkpoints` (oldest first) and hand each piece to `write`,
    which must copy it before returning: the buffer is reused for the next piece.

    Pieces are independent, so they run on a few threads: reads and numpy release the GIL.
    """
    scale = weights.sum()
    work = [(t, rows) for t in tensors for rows in pieces(t.shape)]
    largest = max((math.prod(_shape(t, rows)) for t, rows in work), default=0)
    scratch = threading.local()  # per-thread buffers, reused: no page faults per piece

    def piece(t: Tensor, rows: slice | tuple) -> int:
        if not hasattr(scratch, "acc"):
            scratch.acc, scratch.tmp = np.empty(largest), np.empty(largest)
            scratch.raw = np.empty(largest * 8, np.uint8)
        shape = _shape(t, rows)
        size = math.prod(shape)
        buf = scratch.raw[: size * t.dtype.itemsize].view(t.stored).reshape(shape)
        acc, tmp = scratch.acc[:size].reshape(shape), scratch.tmp[:size].reshape(shape)
        for i, ck in enumerate(checkpoints):
            ck.read(t.name, rows, buf)
            term = acc if i == 0 else tmp
            np.copyto(term, buf.view(t.dtype))  # exact widening to float64
            term *= weights[i]
            if i:
                acc += tmp
        if not allow_nonfinite and not np.isfinite(acc).all():
            _blame_nonfinite(checkpoints, t, rows, buf)
        acc /= scale
        out = buf.view(t.dtype)  # the inputs are folded in: reuse their buffer for the result
        np.copyto(out, acc, casting="unsafe")
        write(t, rows, out)
        return buf.nbytes * len(checkpoints)

    bar = _progress_bar(sum(t.nbytes for t in tensors) * len(checkpoints)) if progress else None
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(piece, t, rows) for t, rows in work]
        try:
            for f in futures:
                done = f.result()
                if bar is not None:
                    bar.update(done)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            if bar is not None:
                bar.close()


def _progress_bar(total: int):
    """A tqdm bar over bytes read, on a terminal only (tqdm is imported only then)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="averaging")


def _blame_nonfinite(checkpoints: Sequence[Checkpoint], t: Tensor, rows, buf: np.ndarray) -> None:
    for ck in checkpoints:
        ck.read(t.name, rows, buf)
        if not np.isfinite(buf.view(t.dtype)).all():
            raise StreamavgError(
                f"{ck.path}: {t.name}: contains NaN or Inf "
                "(pass --allow-nonfinite to average anyway)"
            )
    raise StreamavgError(f"{checkpoints[-1].path}: {t.name}: weighted sum overflowed")
