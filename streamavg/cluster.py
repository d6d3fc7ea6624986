"""The fold on a Dask cluster: tasks named `streamavg-fold-...`, each folding a group of
tensors. Workers open the inputs themselves (shared paths, or URLs) and write their
results straight into the output's temporary files at the tensors' offsets (each shard of
a sharded output is a file of its own), so the client never handles tensor data; the
client publishes the output once every task is done.

>>> from distributed import Client  # doctest: +SKIP
>>> client = Client("tcp://10.0.0.5:8786")  # doctest: +SKIP
>>> streamavg.average(["ckpts/"], scheme="linear", client=client)  # doctest: +SKIP
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .engine import fold, open_all
from .errors import StreamavgError, UsageError, command_line, on_command_line
from .formats import Tensor
from .formats.base import Targets
from .progress import bytes_bar
from .publish import OffsetWriter

TASK_BYTES = 64 << 20  # a task folds about this many bytes of each checkpoint, at least


def dask_client(address: str):
    """A Dask client of the scheduler at `address`; one line if Dask is not installed."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install 'streamavg[dask]'") from None
    return Client(address)


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
    allow_nonfinite: bool,
    progress: bool,
) -> None:
    """Fold `tensors` of `files` into the output `targets` describe, as Dask tasks."""
    if targets is None or not {t.name for t in tensors} <= targets.places.keys():
        raise UsageError(
            "the Dask fold cannot write this output: its tensors are not at fixed offsets "
            "in files (an Orbax checkpoint, or chunked HDF5 datasets)"
        )
    from distributed import as_completed

    parts = groups(tensors, len(client.scheduler_info()["workers"]))
    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(
            _fold_group,
            [str(f) for f in files],
            weights,
            group,
            {t.name: (str(targets.places[t.name][0]), targets.places[t.name][1]) for t in group},
            targets.checksums is not None,
            allow_nonfinite,
            on_command_line(),  # so that a task's errors name options as the caller does
            key=f"streamavg-fold-{run}-{i}",
            pure=False,
        )
        for i, group in enumerate(parts)
    ]
    bar = bytes_bar(sum(t.nbytes for t in tensors) * len(files), "averaging") if progress else None
    sizes = {
        f.key: sum(t.nbytes for t in g) * len(files) for f, g in zip(futures, parts, strict=True)
    }
    try:
        for future in as_completed(futures):
            sums = future.result()  # raises the task's error, as a local fold would
            if sums:
                targets.checksums.update(sums)
            if bar is not None:
                bar.update(sizes[future.key])
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close()


def _fold_group(
    files: list[str],
    weights: np.ndarray,
    tensors: list[Tensor],
    places: dict[str, tuple[str, int]],
    checksummed: bool,
    allow_nonfinite: bool,
    flags: bool,
) -> dict[int, tuple[int, int]] | None:
    """One task, on a worker: fold `tensors` and write each at its place (file, offset);
    the CRC-32 of each range written, if `checksummed` (one file: a `.keras` archive)."""
    sums: dict[int, tuple[int, int]] | None = {} if checksummed else None
    with ExitStack() as stack:
        if flags:
            stack.enter_context(command_line())
        checkpoints = open_all(files, stack)
        writers = {}
        for path in {path for path, _ in places.values()}:
            try:
                writers[path] = OffsetWriter(Path(path), sums)
            except OSError as e:
                raise StreamavgError(
                    f"{path}: a worker cannot write the output's temporary file "
                    f"({e.strerror}); the workers must share the output's filesystem"
                ) from None
            stack.callback(writers[path].close)

        def write(t: Tensor, index: tuple[slice, ...], values: np.ndarray) -> None:
            path, offset = places[t.name]
            writers[path].write_block(offset, t.shape, index, values)

        fold(checkpoints, weights, tensors, write, allow_nonfinite=allow_nonfinite)
    return sums
