"""Thin adapters over the four Keras checkpoint containers, recognised by content.

A :class:`Checkpoint` lists the tensors of one file (name, shape, dtype, which part
of the model they belong to) and reads blocks of them into caller buffers.
Nothing here builds a model or imports Keras.
"""

from __future__ import annotations

import errno
import functools
import io
import itertools
import math
import os
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

import h5py
import numpy as np

from .blocks import flat_start
from .errors import StreamavgError

#: The containers, by the name `inspect` prints, with the suffix Keras expects of each.
SUFFIXES = {
    "keras": ".keras",  # Keras 3 zip: config.json, metadata.json, model.weights.h5
    "keras-weights": ".weights.h5",  # Keras 3 save_weights
    "legacy-h5": ".h5",  # model.save("x.h5"), Keras 2 and 3
    "legacy-weights": ".h5",  # Keras 2 save_weights("x.h5")
}
WEIGHTS_MEMBER = "model.weights.h5"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
#: The root group holding optimizer state, and the one holding the model where not the root.
OPTIMIZER_GROUP = {
    "keras": "optimizer",
    "keras-weights": "optimizer",
    "legacy-h5": "optimizer_weights",
}
_MODEL_GROUP = {"legacy-h5": "model_weights"}
#: The formats Keras loads by layer position (legacy_h5_format.load_weights_from_hdf5_group),
#: whatever the layers' auto-generated names; the others address layers by stable paths.
BY_POSITION = ("legacy-h5", "legacy-weights")
TOP_LEVEL = "top_level_model_weights"  # the model's own weights, loaded after its layers'
#: What h5py raises on damaged metadata, depending on where the damage is met.
HDF5_ERRORS = (OSError, RuntimeError, KeyError, ValueError)
HEAP_WINDOW = 1 << 20  # bytes of metadata searched at a time for global heaps
MAX_EXPANSION = 1100  # deflate expands at most about 1032:1; more than that is a bomb or a lie


class Tensor(NamedTuple):
    """One stored tensor. `dtype` is the logical dtype (bfloat16 for Keras's opaque 2-byte data)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    part: str  # "model", "optimizer" or "other"
    stored: np.dtype  # as h5py reads it: bfloat16 is opaque "V2"

    @property
    def averaged(self) -> bool:
        """Floating-point model weights can be averaged; the rest is compared, copied or
        dropped (see `engine.to_average`)."""
        return self.part == "model" and self.dtype.kind in "fV"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def logical_dtype(stored: np.dtype) -> np.dtype:
    """The dtype Keras meant: untagged 2-byte opaque data is bfloat16 in every Keras format."""
    if stored.kind == "V" and stored.itemsize == 2 and stored.names is None:
        import ml_dtypes  # only where there is bfloat16 to read

        return np.dtype(ml_dtypes.bfloat16)
    return stored


class _Window(io.RawIOBase):
    """Read-only bytes [start, start+size) of a file: an uncompressed zip member, in place."""

    def __init__(self, raw: BinaryIO, start: int, size: int) -> None:
        self._raw, self.start, self._size, self._pos = raw, start, size, 0

    def fileno(self) -> int:
        return self._raw.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + pos
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if not n or self._pos < 0:  # past the member's end (or a nonsense position): nothing
            return 0
        got = os.preadv(self._raw.fileno(), [memoryview(buf)[:n]], self.start + self._pos)
        self._pos += got
        return got

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_member(path: Path) -> tuple[BinaryIO, int]:
    """Open the weights member of a `.keras` zip in place, without extracting it."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise StreamavgError(f"{path}: corrupt .keras archive ({e})") from None
    check_members(path, members)
    info = next((m for m in members if m.filename == WEIGHTS_MEMBER), None)
    if info is None:
        raise StreamavgError(f"{path}: .keras archive has no {WEIGHTS_MEMBER}")
    if info.compress_type != zipfile.ZIP_STORED:  # not as Keras writes it; decompress on the fly
        return zipfile.ZipFile(path).open(info), info.file_size
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the returned window
    header = os.pread(raw.fileno(), 30, info.header_offset)
    if len(header) < 30 or header[:4] != _ZIP_MAGIC:
        raw.close()
        raise StreamavgError(f"{path}: corrupt .keras archive (bad local header)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(raw.fileno()).st_size:
        raw.close()
        raise StreamavgError(f"{path}: corrupt .keras archive (truncated {WEIGHTS_MEMBER})")
    return _Window(raw, start, info.file_size), info.file_size


def check_members(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse a hostile archive: duplicate or escaping names, or sizes no data could have."""
    seen: set[str] = set()
    for m in members:
        name = m.filename
        if name in seen:
            raise StreamavgError(f"{path}: {name}: duplicate member in .keras archive")
        if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
            raise StreamavgError(f"{path}: {name}: member path escapes the .keras archive")
        seen.add(name)
        stored = m.compress_type == zipfile.ZIP_STORED
        if m.file_size > (m.compress_size if stored else MAX_EXPANSION * max(1, m.compress_size)):
            raise StreamavgError(
                f"{path}: {name}: declares {m.file_size:,} bytes from {m.compress_size:,} "
                "(a zip bomb?)"
            )


PROVENANCE_ATTR = "streamavg"  # the root attribute of the weights file of every output


def averaged_by_streamavg(path: str | os.PathLike) -> bool:
    """Whether `path` is an earlier streamavg output (its weights carry our provenance).

    Only the attribute's presence is checked, nothing is decoded; a file that cannot be
    read as a checkpoint says no here and is refused with its reason when opened.
    """
    path = Path(path)
    try:
        magic = _sniff(path)
        member = _open_member(path)[0] if magic.startswith(_ZIP_MAGIC) else None
    except StreamavgError:
        return False
    try:
        with h5py.File(member or path, "r") as h5:
            return PROVENANCE_ATTR in h5.attrs
    except HDF5_ERRORS:
        return False
    finally:
        if member is not None:
            member.close()


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuse what is not a regular file before opening it: a FIFO or a device would
    block the read or never end, and a directory is not one checkpoint."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StreamavgError(f"{path}: no such file") from None
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise StreamavgError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise StreamavgError(f"{path}: not a regular file (a device, FIFO or socket)")


def _sniff(path: Path) -> bytes:
    require_regular_file(path)
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None


def _classify(h5: h5py.File, zipped: bool) -> str | None:
    if zipped:
        return "keras"
    if "model_config" in h5.attrs or "model_weights" in h5:
        return "legacy-h5"
    if "layer_names" in h5.attrs:
        return "legacy-weights"
    if "layers" in h5 or "vars" in h5:
        return "keras-weights"
    return None


def _part(fmt: str, name: str) -> str:
    root = name.split("/", 1)[0]
    if root == OPTIMIZER_GROUP.get(fmt):
        return "optimizer"
    return "model" if root == _MODEL_GROUP.get(fmt, root) else "other"


class Checkpoint:
    """An open checkpoint: its format, its tensors, and block reads into caller buffers.

    Only the model's tensors are listed unless `optimizer` is true. Contiguous data in
    native byte order (all that Keras writes) is read with `os.preadv` straight from the
    file, without h5py's per-call overhead and without holding the GIL.

    >>> with Checkpoint("ckpts/model_10.keras") as ck:  # doctest: +SKIP
    ...     ck.format, list(ck.tensors)[:1]
    ('keras', ['layers/dense/vars/0'])
    """

    def __init__(self, path: str | os.PathLike, *, optimizer: bool = False) -> None:
        self.path = Path(path)
        magic = _sniff(self.path)
        st = self.path.stat()
        self._identity = _identity(st)
        zipped = magic.startswith(_ZIP_MAGIC)
        if not zipped and magic != _HDF5_MAGIC:
            raise StreamavgError(f"{self.path}: not a Keras checkpoint (neither HDF5 nor .keras)")
        self._member: BinaryIO | None = None
        self._fd: int | None = None  # where fast reads go, with the HDF5 image at _base
        self._base = 0
        if zipped:
            self._member, self.size = _open_member(self.path)
            if isinstance(self._member, _Window):
                self._fd, self._base = self._member.fileno(), self._member.start
        else:
            self.size = st.st_size
        try:
            self.h5 = h5py.File(self._member or self.path, "r")
        except OSError as e:
            self._close_member()
            if "unable to lock file" in str(e) and system_errno(e) == errno.EWOULDBLOCK:
                raise StreamavgError(
                    f"{self.path}: open for writing in another process (still being saved?)"
                ) from None
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        if not zipped:
            self._fd = os.open(self.path, os.O_RDONLY)
        self.tensors: dict[str, Tensor] = {}
        self._stored: dict[str, str] = {}  # names in this file, where `rename` changed them
        self._datasets: dict[str, h5py.h5d.DatasetID] = {}
        self._offsets: dict[str, int] = {}  # absolute file offsets of contiguous native data
        try:
            fmt = _classify(self.h5, zipped)
            if fmt is None:
                raise StreamavgError(f"{self.path}: HDF5 file holds no Keras weights")
            self.format = fmt
            self._walk(None if optimizer else OPTIMIZER_GROUP.get(fmt))
        except HDF5_ERRORS as e:
            self.close()
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        except StreamavgError:
            self.close()
            raise

    def _walk(self, skip: str | None) -> None:
        """List datasets in one C-level visit, opening only those outside group `skip`."""
        names: list[bytes] = []
        h5py.h5o.visit(
            self.h5.id,
            lambda name, info: names.append(name) if info.type == h5py.h5o.TYPE_DATASET else None,
            info=True,
        )
        for raw in names:
            name = raw.decode()
            if name.split("/", 1)[0] != skip:
                self._add(name, h5py.h5d.open(self.h5.id, raw))

    def _add(self, name: str, dsid: h5py.h5d.DatasetID) -> None:
        stored, shape = dsid.dtype, dsid.shape
        if shape is None:  # an HDF5 "null" dataspace holds nothing at all
            raise StreamavgError(f"{self.path}: {name}: empty dataspace")
        tensor = Tensor(name, shape, logical_dtype(stored), _part(self.format, name), stored)
        self.tensors[name] = tensor
        self._datasets[name] = dsid
        if tensor.part != "model":
            return
        if not _supported(stored) or dsid.get_type().get_size() != stored.itemsize:
            raise StreamavgError(f"{self.path}: {name}: unsupported dtype {stored}")
        if not tensor.nbytes:
            return
        layout = dsid.get_create_plist().get_layout()
        if layout == h5py.h5d.CHUNKED:
            self._check_chunks(tensor, dsid)
        if layout != h5py.h5d.CONTIGUOUS:
            return
        offset = dsid.get_offset()
        if offset is None or offset + tensor.nbytes > self.size:
            raise StreamavgError(f"{self.path}: {name}: data is missing (truncated file?)")
        if self._fd is not None and stored.isnative:
            self._offsets[name] = self._base + offset

    def _check_chunks(self, t: Tensor, dsid: h5py.h5d.DatasetID) -> None:
        """Every chunk written, and no more data declared than its bytes could expand to."""
        chunks = dsid.get_create_plist().get_chunk()
        expected = math.prod(-(-n // c) for n, c in zip(t.shape, chunks, strict=True))
        if dsid.get_num_chunks() != expected:
            raise StreamavgError(f"{self.path}: {t.name}: data is missing (chunks never written)")
        if t.nbytes > MAX_EXPANSION * max(1, dsid.get_storage_size()):
            raise StreamavgError(
                f"{self.path}: {t.name}: declares {t.nbytes:,} bytes, "
                f"far more than its {dsid.get_storage_size():,} stored bytes can hold"
            )

    @functools.cached_property
    def layers(self) -> list[tuple[str, list[str]]]:
        """The layers with weights, in the order Keras loads them from a legacy file: each
        layer's group and its tensors, in order. Keras pairs them with the model's layers
        by position, so auto-generated names (dense, dense_1) need not agree across files.

        The order is that of the `layer_names` attribute of the model group (the root of a
        weights-only file), skipping layers with no `weight_names`, then the model's own
        weights; within a layer, that of its `weight_names`. Every model tensor must be so
        listed (Keras would not load it otherwise), and listed once.
        """
        model = _MODEL_GROUP.get(self.format)
        prefix = f"{model}/" if model else ""
        self.check_heaps()  # before the attributes are decoded
        layers: list[tuple[str, list[str]]] = []
        listed: set[str] = set()
        try:
            group = self.h5[model] if model else self.h5
            names = _names(group, "layer_names") + ([TOP_LEVEL] if TOP_LEVEL in group else [])
            for layer in names:
                if not isinstance(group.get(layer), h5py.Group):
                    raise StreamavgError(
                        f"{self.path}: {prefix}{layer}: in layer_names, but missing"
                    )
                weights = [f"{prefix}{layer}/{w}" for w in _names(group[layer], "weight_names")]
                for name in weights:
                    if name not in self.tensors:
                        raise StreamavgError(f"{self.path}: {name}: in weight_names, but missing")
                    if name in listed:
                        raise StreamavgError(f"{self.path}: {name}: listed twice in weight_names")
                    listed.add(name)
                if weights:
                    layers.append((prefix + layer, weights))
        except HDF5_ERRORS as e:
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        for name, t in self.tensors.items():
            if t.part == "model" and name not in listed:
                raise StreamavgError(f"{self.path}: {name}: in no layer's weight_names")
        return layers

    def rename(self, names: dict[str, str]) -> None:
        """Key tensors by new names (`names` maps old to new; the others stay), such as the
        newest checkpoint's, so that matched tensors are read by one name in every file.
        Messages still name them as this file does, through `stored_name`."""
        new = {old: names.get(old, old) for old in self.tensors}
        self._stored = {new[n]: self.stored_name(n) for n in self.tensors}
        self.tensors = {new[n]: t._replace(name=new[n]) for n, t in self.tensors.items()}
        self._datasets = {new[n]: d for n, d in self._datasets.items()}
        self._offsets = {new[n]: o for n, o in self._offsets.items()}

    def stored_name(self, name: str) -> str:
        """What tensor `name` is called in this file (not the same after `rename`)."""
        return self._stored.get(name, name)

    def check_heaps(self) -> None:
        """Refuse a global heap that HDF5 would loop on forever when decoding a string
        attribute: a zero-size object, or one running past its collection. Call this before
        reading the attributes of an untrusted file; it reads only the bytes between the
        tensors' data, a window at a time.
        """
        extents = []

        def note(name: bytes, info) -> None:
            if info.type != h5py.h5o.TYPE_DATASET:
                return
            dsid = h5py.h5d.open(self.h5.id, name)
            if dsid.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
                for k in range(dsid.get_num_chunks()):
                    chunk = dsid.get_chunk_info(k)
                    extents.append((chunk.byte_offset, chunk.byte_offset + chunk.size))
            elif (offset := dsid.get_offset()) is not None:
                extents.append((offset, offset + dsid.get_storage_size()))

        try:
            h5py.h5o.visit(self.h5.id, note, info=True)
        except HDF5_ERRORS as e:
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        position = 0
        for start, end in [*sorted(extents), (self.size, self.size)]:
            for at in range(position, start, HEAP_WINDOW):  # overlapping by the signature
                window = self._image(at, min(HEAP_WINDOW + 3, start - at))
                found = window.find(b"GCOL")
                while 0 <= found < HEAP_WINDOW:
                    self._check_heap(at + found, start)
                    found = window.find(b"GCOL", found + 1)
            position = max(position, end)

    def _check_heap(self, at: int, limit: int) -> None:
        """Walk the global heap collection at `at` (ending by `limit`) as HDF5 does."""
        head = self._image(at, 16)
        if len(head) < 16 or head[4] != 1:  # not a version 1 collection: no heap here
            return
        (size,) = struct.unpack_from("<Q", head, 8)
        p, end = at + 16, min(at + size, limit)
        while p + 16 <= end:
            index, _, _, length = struct.unpack("<HHIQ", self._image(p, 16))
            step = length if index == 0 else 16 + -(-length // 8) * 8
            if step == 0 or p + step > end:
                raise StreamavgError(f"{self.path}: corrupt HDF5 (bad object in a global heap)")
            p += step

    def _image(self, offset: int, size: int) -> bytes:
        """`size` bytes of the HDF5 image from `offset`: the file, or the .keras member."""
        if self._fd is not None:
            return os.pread(self._fd, size, self._base + offset)
        self._member.seek(offset)
        return self._member.read(size)

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        """Read block `index` of tensor `name` (`()`: all of it) into `out`, in the stored
        dtype; failures name the file and the tensor. Blocks come from `blocks.blocks`."""
        offset = self._offsets.get(name)
        if not out.nbytes:
            return
        try:
            if offset is None:
                h5py.Dataset(self._datasets[name]).read_direct(out, source_sel=index or None)
                return
            offset += flat_start(self.tensors[name].shape, index) * out.itemsize
            fd = self._fd if self._fd is not None else self._reopen()
            try:
                got = os.preadv(fd, [out.reshape(-1).view(np.uint8)], offset)
            finally:
                if fd != self._fd:
                    os.close(fd)
            if got != out.nbytes:
                raise OSError("unexpected end of file")
        except (OSError, RuntimeError, TypeError) as e:
            raise StreamavgError(
                f"{self.path}: {self.stored_name(name)}: unreadable ({reason(e)})"
            ) from None

    def read_whole(self, name: str) -> np.ndarray:
        """All of tensor `name`, in its logical dtype."""
        t = self.tensors[name]
        out = np.empty(t.shape, t.stored)
        self.read(name, (), out)
        return out.view(t.dtype)

    def release(self) -> None:
        """Close the file between reads, for more checkpoints than open files allow.

        Each read then reopens it by path and checks that it is still the same file.
        """
        if self._datasets:
            raise StreamavgError(
                f"{self.path}: too many checkpoints for the open-file limit, and this one is "
                "stored chunked or compressed, so it must stay open (raise `ulimit -n`)"
            )
        self.close()
        self._fd = None

    def _reopen(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.check_unchanged(os.fstat(fd))
        except StreamavgError:
            os.close(fd)
            raise
        return fd

    def check_unchanged(self, st: os.stat_result | None = None) -> None:
        """Refuse a file that changed since it was opened: it is still being written."""
        try:
            st = st or self.path.stat()
        except OSError:
            raise StreamavgError(f"{self.path}: removed while being averaged") from None
        if _identity(st) != self._identity:
            raise StreamavgError(
                f"{self.path}: changed while being averaged (still being written?)"
            )

    def drop_hdf5(self) -> None:
        """Close the HDF5 handle if every model tensor can be read straight from the file."""
        model = (n for n, t in self.tensors.items() if t.part == "model" and t.nbytes)
        if all(n in self._offsets for n in model):
            self.h5.close()
            self._datasets.clear()

    def _close_member(self) -> None:
        if self._member is not None:
            self._member.close()

    def close(self) -> None:
        self.h5.close()
        if self._fd is not None and self._member is None:
            os.close(self._fd)
        self._close_member()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _names(group: h5py.Group, key: str) -> list[str]:
    """A list of names in attribute `key`, or in `key0`, `key1`... where Keras split a long
    one (legacy_h5_format.load_attributes_from_hdf5_group)."""
    numbered = (f"{key}{i}" for i in itertools.count())
    parts = [key] if key in group.attrs else itertools.takewhile(group.attrs.__contains__, numbered)
    return [
        n.decode() if isinstance(n, bytes) else str(n)
        for part in parts
        for n in np.ravel(group.attrs[part])
    ]


def _supported(stored: np.dtype) -> bool:
    """Model tensors are IEEE floats, bfloat16 (2-byte opaque), integers or booleans."""
    if stored.kind == "f":
        return stored.itemsize in (2, 4, 8)
    return stored.kind in "iub" or (
        stored.kind == "V" and stored.itemsize == 2 and not stored.names
    )


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while a file is being read: which file, its size, its mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def system_errno(e: BaseException) -> int | None:
    """The operating system's error number behind `e`, also when HDF5 wraps it in text."""
    found = re.search(r"errno = (\d+)", str(e))
    return getattr(e, "errno", None) or (int(found[1]) if found else None)


def reason(e: BaseException) -> str:
    """The last clause of an HDF5 error, which names the cause without the call stack."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.rstrip(")").split("(", 1)[-1].strip() if "(" in text else text
