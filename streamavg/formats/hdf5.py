"""HDF5 checkpoints: Keras 3 `.weights.h5`, and legacy `.h5` from Keras 2 and 3 (full
models and weights only), told apart by content. Also the HDF5 image inside a `.keras`
archive, which `keras_zip` opens through this reader, and in checkpoint folders (`bundle`).

The reader lists datasets in one C-level visit and reads contiguous data with `os.preadv`
straight from the file; the writer copies the template's groups and attributes and writes
fresh tensors at their file offsets. Nothing here builds a model or imports Keras.
"""

from __future__ import annotations

import bisect
import errno
import functools
import importlib
import itertools
import json
import math
import os
import re
import struct
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..blocks import block_shape, flat_start
from ..errors import StreamavgError, reason, system_errno
from ..publish import OffsetWriter
from ..remote import METADATA_MERGE, as_path
from .base import (
    PROVENANCE_KEY,
    Companion,
    LocalFile,
    ReaderBase,
    Targets,
    Tensor,
    Write,
    open_file,
)


class _Deferred:
    """Module `name`, imported when first used: a run of other containers never pays for
    h5py (40 ms and 12 MB at start-up). Python's import is thread-safe; importlib's
    LazyLoader is not (threads that open checkpoints at once saw a half-made module)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


h5py = _Deferred("h5py")

SUFFIXES = {
    "keras-weights": ".weights.h5",  # Keras 3 save_weights
    "legacy-h5": ".h5",  # model.save("x.h5"), Keras 2 and 3
    "legacy-weights": ".h5",  # Keras 2 save_weights("x.h5")
}
#: The names Keras reads each under (`load_weights` takes `.weights.h5` for Keras 3
#: weights, so a legacy file must not be named so).
ACCEPTED = {
    "keras-weights": (".weights.h5",),
    "legacy-h5": (".h5", ".hdf5"),
    "legacy-weights": (".h5", ".hdf5"),
}
MAGIC = b"\x89HDF\r\n\x1a\n"
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


def logical_name(stored: np.dtype) -> str:
    """The dtype Keras meant: untagged 2-byte opaque data is bfloat16 in every Keras format."""
    if stored.kind == "V" and stored.itemsize == 2 and stored.names is None:
        return "bfloat16"
    return stored.name


def claims(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def open_checkpoint(
    path: Path, *, optimizer: bool = False, like: Checkpoint | None = None
) -> Checkpoint:
    return Checkpoint(path, optimizer=optimizer, like=like)


def averaged(source: Path | BinaryIO) -> bool:
    """Whether the HDF5 file `source` is an earlier streamavg output: only the provenance
    attribute's presence is checked, nothing is decoded. A file that cannot be read says
    no here, and is refused with its reason when opened."""
    try:
        with ExitStack() as stack:
            if not hasattr(source, "read"):  # a path
                source = stack.enter_context(closing(open_file(source))).handle()
            with h5py.File(source, "r") as h5:
                return PROVENANCE_KEY in h5.attrs
    except (*HDF5_ERRORS, StreamavgError):
        return False


def _classify(h5: h5py.File) -> str | None:
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


class Checkpoint(ReaderBase):
    """An open HDF5 checkpoint: its format, its tensors, and block reads into buffers.

    Only the model's tensors are listed unless `optimizer` is true. Contiguous data in
    native byte order (all that Keras writes) is read with `os.preadv` straight from the
    file, without h5py's per-call overhead and without holding the GIL. `image` is the
    HDF5 image inside a `.keras` archive: a file object, with the fd and offset of its
    bytes if it is stored in place (see `keras_zip`); `format` then names that container.

    >>> with Checkpoint("ckpts/model_10.weights.h5") as ck:  # doctest: +SKIP
    ...     ck.format, list(ck.tensors)[:1]
    ('keras-weights', ['layers/dense/vars/0'])
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        optimizer: bool = False,
        image: tuple[BinaryIO, LocalFile, int | None, int] | None = None,
        format: str | None = None,
        like: Checkpoint | None = None,
    ) -> None:
        self.path = as_path(path)
        self._member: BinaryIO | None = None
        # The file, and where the HDF5 image starts in it (None: not in place, compressed).
        self._base: int | None = 0
        if image is not None:
            self._member, self._source, self._base, self.size = image
        else:  # the HDF5 file itself
            self._source = open_file(self.path)
            self.size = self._source.size
        self.tensors: dict[str, Tensor] = {}
        self._stored: dict[str, str] = {}  # names in this file, where `rename` changed them
        self._datasets: dict[str, h5py.h5d.DatasetID] = {}
        self._offsets: dict[str, int] = {}  # absolute file offsets of contiguous native data
        self._optimizer = optimizer
        self._like: Checkpoint | None = None  # whose listing this one shares, if any
        self.h5: h5py.File | None = None
        if like is not None and self._adopt(like):
            return
        try:
            self.h5 = h5py.File(self._member or self._source.handle(), "r")
        except OSError as e:
            self.close()
            if "unable to lock file" in str(e) and system_errno(e) == errno.EWOULDBLOCK:
                raise StreamavgError(
                    f"{self.path}: open for writing in another process (still being saved?)"
                ) from None
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        try:
            fmt = format or _classify(self.h5)
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

    def _adopt(self, like: Checkpoint) -> bool:
        """Share `like`'s listing if this file is built the same way: an HDF5 image of the
        same size with the same bytes outside the datasets' data. Those bytes are all that
        HDF5 reads to list tensors, their shapes, dtypes and places, so every check made
        on `like` holds here too. Checkpoints of one run usually are built so; any other
        file is listed in full."""
        if not like._direct or like.size != self.size or like._optimizer != self._optimizer:
            return False
        if like._metadata is None:
            return False
        if self._base is not None:  # all at once, from a store
            for (start, end), _ in like._metadata:
                self._source.prefetch(self._base + start, end - start, METADATA_MERGE)
        try:
            for (start, end), data in like._metadata:
                if self._image(start, end - start) != data:
                    return False
        except OSError:
            return False
        self.format, self.tensors, self._like = like.format, dict(like.tensors), like
        self._offsets = {n: at - like._base + self._base for n, at in like._offsets.items()}
        return True

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
        tensor = Tensor(name, shape, logical_name(stored), _part(self.format, name), stored)
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
        if self._base is not None and stored.isnative:
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
        if self._like is not None:
            return self._like.layers  # the same bytes, the same layers
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
        if self._like is not None:
            return self._like.check_heaps()  # the same bytes
        for start, end in self._gaps:
            for at in range(start, end, HEAP_WINDOW):  # overlapping by the signature
                window = self._image(at, min(HEAP_WINDOW + 3, end - at))
                found = window.find(b"GCOL")
                while 0 <= found < HEAP_WINDOW:
                    self._check_heap(at + found, end)
                    found = window.find(b"GCOL", found + 1)

    @functools.cached_property
    def _layout(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Where every dataset's data lies in the HDF5 image ([start, end), sorted), and
        where every object's header starts."""
        extents, headers = [], []

        def note(name: bytes, info) -> None:
            headers.append(info.addr)
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
        return sorted(extents), headers

    @functools.cached_property
    def _gaps(self) -> list[tuple[int, int]]:
        """The byte ranges of the HDF5 image outside every dataset's data: its metadata."""
        gaps, position = [], 0
        for start, end in [*self._layout[0], (self.size, self.size)]:
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        return gaps

    @functools.cached_property
    def _metadata(self) -> list[tuple[tuple[int, int], bytes]] | None:
        """The bytes of each of `_gaps`, which another file must match to share the listing;
        None if data and metadata are not cleanly apart (datasets' data overlapping, or an
        object header inside data), as no tool writes them: such a file shares nothing."""
        extents, headers = self._layout
        if any(a[1] > b[0] for a, b in itertools.pairwise(extents)):
            return None
        starts = [start for start, _ in extents]
        for at in headers:
            k = bisect.bisect_right(starts, at) - 1
            if k >= 0 and at < extents[k][1]:
                return None
        if self._base is not None:  # all at once, from a store
            for start, end in self._gaps:
                self._source.prefetch(self._base + start, end - start, METADATA_MERGE)
        return [((start, end), self._image(start, end - start)) for start, end in self._gaps]

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
        if self._base is not None:
            return self._source.read(self._base + offset, size)
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
            self._source.read_into(offset, out)
        except (OSError, RuntimeError, TypeError) as e:
            raise StreamavgError(
                f"{self.path}: {self.stored_name(name)}: unreadable ({reason(e)})"
            ) from None

    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None:
        offset, t = self._offsets.get(name), self.tensors[name]
        item = t.stored.itemsize
        if offset is not None and (size := math.prod(block_shape(t.shape, index)) * item):
            self._source.prefetch(offset + flat_start(t.shape, index) * item, size, merge)

    def skip_data(self, names: Collection[str]) -> None:
        """Let HDF5's copy of this file read the data of tensors `names` as zeros, where
        that saves fetching it (an object in a store): the copy's is written over."""
        extents = ((self._offsets[n], self.tensors[n].nbytes) for n in names if n in self._offsets)
        self._source.skip((at, at + size) for at, size in extents)

    @property
    def _direct(self) -> bool:
        """Whether every model tensor with data is read straight from the file, by offset."""
        model = (n for n, t in self.tensors.items() if t.part == "model" and t.nbytes)
        return all(n in self._offsets for n in model)

    def settle(self, release: bool) -> None:
        """Close the HDF5 handle if every model tensor can be read straight from the file;
        with `release`, close the file too, and reopen it by path for each read, checking
        that it is still the same file."""
        if self._direct:
            self._close_h5()
        if not release:
            return
        if self._datasets:
            raise StreamavgError(
                f"{self.path}: too many checkpoints for the open-file limit, and this one is "
                "stored chunked or compressed, so it must stay open (raise `ulimit -n`)"
            )
        self._close_h5()
        self._close_member()
        self._source.release()

    def check_unchanged(self) -> None:
        self._source.check_unchanged()

    @property
    def provenance(self) -> dict | None:
        value = self.attribute(PROVENANCE_KEY)
        return None if value is None else json.loads(value)

    def attribute(self, key: str) -> str | None:
        """Root attribute `key` as text, its heaps checked before it is decoded."""
        if self._like is not None:
            return self._like.attribute(key)  # the same bytes
        self.check_heaps()
        try:
            with ExitStack() as stack:  # reopened where `settle` closed it (closed: false)
                h5 = self.h5 or stack.enter_context(
                    h5py.File(self._member or self._source.handle(), "r")
                )
                value = h5.attrs.get(key)
        except HDF5_ERRORS as e:
            raise StreamavgError(f"{self.path}: corrupt HDF5 ({reason(e)})") from None
        return None if value is None else _text(value)

    def companions(self) -> list[Companion]:
        """A legacy full model's architecture: its `model_config` attribute (JSON). Not its
        `training_config`, whose learning rate changes as the model trains."""
        config = self.attribute("model_config") if self.format == "legacy-h5" else None
        if config is None:
            return []
        data = config.encode()
        return [Companion("model_config", len(data), lambda: iter((data,)), json=True)]

    def match(self, ref: Checkpoint) -> None:
        """Pair a legacy file's tensors with `ref`'s by (layer, weight) position, as Keras
        loads them, and rename them to `ref`'s names; the fold then reads one name in each.

        Two runs of one architecture may name their layers differently (dense, dense_1 in
        one, dense_1, dense in the other), so names cannot be matched; as a check that the
        models agree, the paired weights must have the same leaf name (kernel, bias).
        """
        if self.format not in BY_POSITION:
            return
        have, want = self.layers, ref.layers
        if len(have) != len(want):
            raise StreamavgError(
                f"{self.path}: {len(have)} layers with weights here, {len(want)} in {ref.path}"
            )
        names = {}
        for (layer, mine), (ref_layer, theirs) in zip(have, want, strict=True):
            if len(mine) != len(theirs):
                raise StreamavgError(
                    f"{self.path}: {layer}: {len(mine)} weights here, "
                    f"{len(theirs)} in {ref_layer} of {ref.path}"
                )
            for name, ref_name in zip(mine, theirs, strict=True):
                if _leaf(name) != _leaf(ref_name):
                    raise StreamavgError(
                        f"{self.path}: {name}: a {_leaf(name)}, where {ref.path} has a "
                        f"{_leaf(ref_name)} ({ref_name}) in its place"
                    )
                names[name] = ref_name
        self.rename(names)

    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> AbstractContextManager[Write]:
        return h5_like(self, tmp, fresh, optimizer=optimizer, provenance=provenance)

    def _close_member(self) -> None:
        if self._member is not None:
            self._member.close()

    def _close_h5(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        self._datasets.clear()

    def close(self) -> None:
        self._close_h5()
        self._close_member()
        self._source.close()


def _leaf(name: str) -> str:
    """A weight's own name, without its layers' names or TensorFlow's ':0' suffix."""
    return re.sub(r":\d+$", "", name.rsplit("/", 1)[-1])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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


@contextmanager
def h5_like(
    template: Checkpoint,
    path: Path,
    fresh: Collection[str],
    *,
    optimizer: bool,
    provenance: dict,
    userblock: int = 0,
    checksums: dict[int, tuple[int, int]] | None = None,
) -> Iterator[Write]:
    """Write an HDF5 file shaped like `template`; yield `write(name, values, index=())`
    that fills the `fresh` tensors, whole or a block (from `blocks.blocks`) at a time.

    Each group under the root is copied whole by HDF5 (`H5Ocopy`: attributes, dtypes,
    storage layout and data), except the optimizer group unless `optimizer` is true; the
    `fresh` tensors' copied data is then written over. Contiguous ones are written with
    `os.pwritev` at their offsets, which runs on any thread without the GIL; others go
    through h5py. The first `userblock`
    bytes are left for the caller (a `.keras` archive's zip header). If `checksums` is
    given, it receives the CRC-32 of every range written with `os.pwritev`, by offset:
    (size, crc), so a `.keras` archive need not read them back.
    """
    fresh = set(fresh)
    created: dict[str, h5py.Dataset] = {}
    offsets: dict[str, int] = {}
    dropped = None if optimizer else OPTIMIZER_GROUP.get(template.format)

    def replicate() -> None:
        _copy_attrs(template.h5, out)
        for key in template.h5:  # each subtree copied whole, in C
            if key != dropped:
                h5py.h5o.copy(template.h5.id, key.encode(), out.id, key.encode())
        for name in fresh:
            created[name] = ds = out[name]
            contiguous = ds.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
            if contiguous and ds.dtype.isnative and (offset := ds.id.get_offset()) is not None:
                offsets[name] = offset

    out = h5py.File(path, "w", userblock_size=userblock)
    try:
        try:
            template.check_heaps()  # before any of its attributes is decoded
            template.skip_data(fresh)
            replicate()
        except HDF5_ERRORS as e:
            if system_errno(e):
                raise  # the output could not be written
            raise StreamavgError(f"{template.path}: corrupt HDF5 ({reason(e)})") from None
        out.attrs[PROVENANCE_KEY] = json.dumps(provenance)
        out.flush()  # the layout on disk: other processes read and send it (streamavg.cluster)
        writer = OffsetWriter(path, checksums)
        try:

            def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
                ds = created[name]
                data = np.ascontiguousarray(values).view(ds.dtype)
                offset = offsets.get(name)
                if offset is None:
                    ds.write_direct(data, dest_sel=index or None)
                else:
                    writer.write_block(offset, ds.shape, index, data)

            places = {name: (path, offset) for name, offset in offsets.items()}
            write.targets = Targets(places, checksums)  # for writers in other processes
            yield write
        finally:
            writer.close()
    except BaseException:
        with suppress(*HDF5_ERRORS):  # a close that fails too must not hide why we stopped
            out.close()
        raise
    out.close()


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    for key in src.attrs:
        dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
