"""Writing results: a checkpoint laid out like a template, put in place atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import h5py
import numpy as np

from .errors import UsageError
from .formats import OPTIMIZER_GROUP, SUFFIXES, WEIGHTS_MEMBER, Checkpoint, flat_start

OUTPUT_DIR = "averaged"  # default outputs go here, out of reach of a later scan of the inputs


def default_output(newest: Checkpoint, scheme: str, n: int) -> Path:
    """`<dir>/averaged/<newest>.avg-<scheme>-n<n><suffix>`, keeping the suffix Keras expects."""
    name = newest.path.name
    stem = name.removesuffix(SUFFIXES[newest.format]).removesuffix(newest.path.suffix)
    suffix = SUFFIXES[newest.format] if newest.format != "legacy-h5" else newest.path.suffix
    return newest.path.parent / OUTPUT_DIR / f"{stem}.avg-{scheme}-n{n}{suffix}"


def check_output(dest: Path, inputs: Collection[Path], overwrite: bool) -> None:
    """Refuse an output that is one of the inputs, or that exists without `overwrite`."""
    for p in inputs:
        if dest.resolve() == p.resolve() or (dest.exists() and os.path.samefile(dest, p)):
            raise UsageError(f"{dest}: output is one of the inputs")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest}: already exists (pass --overwrite to replace it)")
    if dest.is_dir():
        raise UsageError(f"{dest}: is a directory")


@contextmanager
def atomic_output(dest: Path, overwrite: bool, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; durably rename it onto `dest` if the block succeeds.

    On failure the temporary file goes, and so do the directories made for `dest`. The
    temporary name ends with `suffix`, for writers that insist on one (Keras's save_weights).
    """
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_output(dest, (), overwrite)  # it may have appeared while we worked
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for d in made:
            with suppress(OSError):
                d.rmdir()
        raise


@contextmanager
def h5_like(
    template: Checkpoint,
    path: Path,
    fresh: Collection[str],
    *,
    optimizer: bool,
    provenance: dict,
) -> Iterator[Callable[[str, np.ndarray, tuple[slice, ...]], None]]:
    """Write an HDF5 file shaped like `template`; yield `write(name, values, index=())`
    that fills the `fresh` tensors, whole or a block (from `formats.blocks`) at a time.

    Groups, attributes, dtypes and storage layout are copied, and so are the other tensors
    with their data; the optimizer group is left out unless `optimizer` is true. Contiguous
    fresh tensors get their file space up front and are written with `os.pwritev`, which
    runs on any thread without the GIL; others go through h5py.
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

    with h5py.File(path, "w") as out:
        replicate(template.h5, out)
        out.attrs["streamavg"] = json.dumps(provenance)
        fd = os.open(path, os.O_WRONLY)
        try:

            def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
                ds = created[name]
                data = np.ascontiguousarray(values).view(ds.dtype)
                offset = offsets.get(name)
                if offset is None:
                    ds.write_direct(data, dest_sel=index or None)
                    return
                offset += flat_start(ds.shape, index) * data.itemsize
                view = memoryview(data.reshape(-1).view(np.uint8))
                while view:
                    done = os.pwritev(fd, [view], offset)
                    view, offset = view[done:], offset + done

            yield write
        finally:
            os.close(fd)


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    for key in src.attrs:
        dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)


@contextmanager
def weights_file(template: Checkpoint, dest: Path) -> Iterator[Path]:
    """Where the HDF5 weights go: `dest` itself, or for a `.keras` archive a temporary file
    beside it, packed into `dest` with the template's other members once written."""
    if template.format != "keras":
        yield dest
        return
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=dest.name, suffix=".h5") as h5:
        yield Path(h5.name)
        _pack_keras(template, Path(h5.name), dest)


def _pack_keras(template: Checkpoint, weights_file: Path, dest: Path) -> None:
    """Write a `.keras` archive: the template's members, with `weights_file` as its weights."""
    with zipfile.ZipFile(template.path) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            if info.filename != WEIGHTS_MEMBER:
                out.writestr(info, src.read(info))
                continue
            member = zipfile.ZipInfo(WEIGHTS_MEMBER, date_time=info.date_time)
            member.compress_type = info.compress_type
            with open(weights_file, "rb") as f, out.open(member, "w", force_zip64=True) as w:
                shutil.copyfileobj(f, w, 1 << 20)
