"""Safetensors weights: one `.safetensors` file, or a sharded set (a `*.safetensors.index.json`
whose `weight_map` names each tensor's shard, and the shards beside it), which a Hugging Face
folder holds (see `bundle`).

A file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and `data_offsets` from the start of the data), then the tensors' bytes, tiling the data
exactly. The header is parsed and checked here, without the `safetensors` package;
tensors are read with `os.preadv` at their offsets. The output is laid out like the
newest input: the same tensors at the same offsets, its `__metadata__` with our
provenance added, integers copied byte for byte, the averaged tensors written in place.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..blocks import block_shape, flat_start
from ..errors import StreamavgError, reason
from ..publish import OffsetWriter
from . import shard_index
from .base import (
    PROVENANCE_KEY,
    Reader,
    ReaderBase,
    Targets,
    Tensor,
    Write,
    open_file,
    require_regular_file,
)

SUFFIXES = {"safetensors": ".safetensors"}
ACCEPTED = {"safetensors": (".safetensors",)}
SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"  # model.safetensors.index.json, as transformers names it
MAX_HEADER = 100_000_000  # bytes: the safetensors library's limit, for headers and indexes alike
INDEXES = shard_index.Kind(INDEX_SUFFIX, "safetensors index", MAX_HEADER, lists=False)
METADATA = "__metadata__"
COPY_BYTES = 1 << 20  # a tensor copied from the newest checkpoint goes this much at a time
#: The dtypes of safetensors, by code: numpy's, or for those ml_dtypes provides the raw
#: storage and the name (ml_dtypes is imported only where their values are asked for:
#: importing it takes a good part of a second).
DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": ("<u2", "bfloat16"),
    "F8_E4M3": ("u1", "float8_e4m3fn"),
    "F8_E5M2": ("u1", "float8_e5m2"),
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


def claims(path: Path, head: bytes) -> bool:
    """A file named `*.safetensors`, or whose first bytes are a plausible header length
    followed by the header's opening brace (a folder of them is a `bundle`)."""
    if not head and path.is_dir():
        return False
    if path.name.endswith(SUFFIX):
        return True
    return len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER


def open_checkpoint(path: Path, *, optimizer: bool = False, like: Reader | None = None) -> Reader:
    """One file. Safetensors hold no optimizer state to list, and a header is parsed as fast
    as it could be compared with `like`'s, so both are ignored."""
    return Checkpoint(path)


def averaged(path: Path) -> bool:
    """Whether `path` carries our provenance; only its header is read."""
    try:
        with _File(path) as file:
            return PROVENANCE_KEY in (file.metadata or {})
    except StreamavgError:
        return False


def parts(directory: Path) -> dict[str, Path]:
    """The index files in `directory` and the shards they list, each owned by the folder
    (a Hugging Face folder is one checkpoint); an index that cannot be read lists none."""
    listed = shard_index.parts(directory, INDEXES)
    return dict.fromkeys([*(index.name for index in listed.values()), *listed], directory)


class _Entry(NamedTuple):
    """One tensor's header entry: its dtype code, stored and logical dtypes, shape, data
    range."""

    code: str
    dtype: np.dtype  # as stored: raw unsigned integers for ml_dtypes' types
    logical: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _naturals(value: object) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


class _File:
    """One open safetensors file: its header's tensors in file order, its metadata, and
    reads at its offsets; the file is reopened per read once `release`d."""

    def __init__(self, path: Path) -> None:
        self.path = path
        require_regular_file(path)
        self.source = open_file(path)
        try:
            self.size = self.source.size
            self.metadata, self.entries, self.data_start = self._header()
        except BaseException:
            self.close()
            raise

    def _header(self) -> tuple[dict[str, str] | None, dict[str, _Entry], int]:
        """Parse and check the header: refuse, in one line, what the library would not read
        and what it would read wrongly (a repeated key: its last value wins there)."""
        path = self.path
        if self.size < 8:
            raise StreamavgError(f"{path}: too short for a safetensors file ({self.size} bytes)")
        (length,) = struct.unpack("<Q", self.source.read(0, 8))
        if length > MAX_HEADER:
            raise StreamavgError(
                f"{path}: safetensors header of {length:,} bytes, over the limit of {MAX_HEADER:,}"
            )
        raw = self.source.read(8, length)
        if len(raw) != length:
            raise StreamavgError(
                f"{path}: safetensors header of {length:,} bytes runs past the end of the "
                f"file ({self.size:,} bytes; truncated?)"
            )
        header = shard_index.parse_json(path, raw, "safetensors header")
        if not isinstance(header, dict):
            raise StreamavgError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop(METADATA, None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise StreamavgError(f"{path}: {METADATA} is not an object of strings")
        entries = {name: _entry(path, name, info) for name, info in header.items()}
        _check_tiling(path, entries, self.size - 8 - length)
        return metadata, entries, 8 + length

    def read_into(self, name: str, out: np.ndarray, begin: int) -> None:
        """Fill `out` with the data of tensor `name` from byte `begin` of the data."""
        try:
            self.source.read_into(self.data_start + begin, out)
        except OSError as e:
            raise StreamavgError(f"{self.path}: {name}: unreadable ({reason(e)})") from None

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entry(path: Path, name: str, info: object) -> _Entry:
    """Tensor `name`'s header entry, checked: a known dtype, a shape, and a data range
    holding exactly its bytes. Other keys are ignored, as the library ignores them."""
    if not isinstance(info, dict):
        raise StreamavgError(f"{path}: {name}: header entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise StreamavgError(f"{path}: {name}: header entry has no {key}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise StreamavgError(f"{path}: {name}: unknown dtype {json.dumps(code)}")
    if not _naturals(shape):
        raise StreamavgError(f"{path}: {name}: shape is not a list of non-negative integers")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise StreamavgError(
            f"{path}: {name}: data_offsets is not [begin, end] with 0 <= begin <= end"
        )
    (dtype, logical), (begin, end) = _dtype(code), offsets
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise StreamavgError(
            f"{path}: {name}: data_offsets hold {end - begin:,} bytes, but shape {shape} "
            f"of {code} needs {need:,}"
        )
    return _Entry(code, dtype, logical, tuple(shape), begin, end)


@functools.cache
def _dtype(code: str) -> tuple[np.dtype, str]:
    """The stored dtype of `code` and the logical dtype's name."""
    found = DTYPES[code]
    stored, name = found if isinstance(found, tuple) else (found, np.dtype(found).name)
    return np.dtype(stored), name


def _check_tiling(path: Path, entries: dict[str, _Entry], size: int) -> None:
    """The tensors' data must cover the `size` bytes after the header exactly, as the
    library requires: nothing out of range, overlapping, between or after them."""
    for name, e in entries.items():
        if e.end > size:
            raise StreamavgError(
                f"{path}: {name}: data ends at byte {e.end:,}, past the {size:,} bytes of "
                "data (truncated file?)"
            )
    position, previous = 0, None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin < position:
            raise StreamavgError(f"{path}: {name}: data overlaps that of {previous}")
        if e.begin > position:
            raise StreamavgError(
                f"{path}: {name}: {e.begin - position:,} bytes before its data belong to no "
                "tensor (the safetensors library refuses gaps)"
            )
        position, previous = e.end, name
    if position < size:
        raise StreamavgError(
            f"{path}: {size - position:,} bytes after the last tensor's data (the "
            "safetensors library refuses them)"
        )


class _Safetensors(ReaderBase):
    """What one file and a sharded folder share: tensors found in their files, read there."""

    def _list(self, files: dict[str, _File]) -> None:
        """Key every tensor of `files` (by file name, in the order they are laid out)."""
        self._files = files
        self._where = {n: (f, e) for f in files.values() for n, e in f.entries.items()}
        self.tensors = {
            n: Tensor(n, e.shape, e.logical, "model", e.dtype) for n, (_, e) in self._where.items()
        }

    def layer(self, name: str) -> str:
        """Tensors are named by dotted paths (`model.layers.0.weight`): the module's path."""
        return name.rpartition(".")[0]

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        file, e = self._where[name]
        if out.nbytes:
            file.read_into(name, out, e.begin + flat_start(e.shape, index) * out.itemsize)

    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None:
        file, e = self._where[name]
        item = e.dtype.itemsize
        if size := math.prod(block_shape(e.shape, index)) * item:
            start = file.data_start + e.begin + flat_start(e.shape, index) * item
            file.source.prefetch(start, size, merge)

    def settle(self, release: bool) -> None:
        """With `release`, close every file; each read then reopens it by path, checking
        that it is still the same file."""
        if release:
            for file in self._files.values():
                file.source.release()

    def check_unchanged(self) -> None:
        for file in self._files.values():
            file.source.check_unchanged()

    def close(self) -> None:
        for file in self._files.values():
            file.close()


class Checkpoint(_Safetensors):
    """An open `.safetensors` file.

    >>> with Checkpoint(Path("ckpts/step_100.safetensors")) as ck:  # doctest: +SKIP
    ...     ck.format, list(ck.tensors)[:1]
    ('safetensors', ['model.embed_tokens.weight'])
    """

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = _File(path)
        self._list({path.name: self._file})
        self.size = self._file.size

    @property
    def provenance(self) -> dict | None:
        return _provenance(self.path, self._file.metadata or {}, METADATA)

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        with _written({tmp: self._file}, fresh, provenance) as write:
            yield write


class Sharded(_Safetensors):
    """Sharded safetensors weights: an index and every shard that it lists beside it, each
    tensor in the shard the `weight_map` names, and there only."""

    format = "safetensors-sharded"

    def __init__(self, index: Path) -> None:
        self.path = index
        self._index = shard_index.read(index, INDEXES)
        self._weight_map = {name: shard for name, [shard] in self._index.weight_map.items()}
        self._files: dict[str, _File] = {}
        try:
            for shard in sorted(self._index.shards):
                if not (index.parent / shard).exists():
                    raise StreamavgError(
                        f"{index.parent / shard}: listed in {index.name}, but missing"
                    )
                self._files[shard] = _File(index.parent / shard)
            self._check_placement()
        except BaseException:
            self.close()
            raise
        self._list(self._files)
        self.size = self._index.stat.st_size + sum(f.size for f in self._files.values())
        self.open_files = len(self._files)

    @property
    def files(self) -> list[str]:
        """The file names it spans: the index, then its shards."""
        return [self.path.name, *self._files]

    def _check_placement(self) -> None:
        """Every tensor in one shard, the one the `weight_map` names for it."""
        index, seen = self.path.name, {}
        for shard, file in self._files.items():
            for name in file.entries:
                if name in seen:
                    raise StreamavgError(f"{file.path}: {name}: also in {seen[name]}")
                seen[name] = shard
        for shard, file in self._files.items():
            for name in file.entries:
                if name not in self._weight_map:
                    raise StreamavgError(f"{file.path}: {name}: not in the weight_map of {index}")
                if self._weight_map[name] != shard:
                    raise StreamavgError(
                        f"{file.path}: {name}: here, but the weight_map of {index} puts it in "
                        f"{self._weight_map[name]}"
                    )
        for name, shard in self._weight_map.items():
            if name not in self._files[shard].entries:
                raise StreamavgError(
                    f"{self._files[shard].path}: {name}: in the weight_map of {index}, but "
                    "missing from this shard"
                )

    @property
    def provenance(self) -> dict | None:
        return _provenance(self.path, self._index.metadata, "metadata")

    def check_unchanged(self) -> None:
        self._index.check_unchanged()
        super().check_unchanged()

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        """The index at `tmp`, with our provenance in its metadata, written as transformers
        writes one (sorted, indented), and the shards beside it, named and laid out as
        this one's."""
        metadata = {**self._index.metadata, PROVENANCE_KEY: provenance}
        document = {**self._index.document, "metadata": metadata}
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        tmp.write_text(text, encoding="utf-8")
        shards = {tmp.parent / shard: file for shard, file in self._files.items()}
        with _written(shards, fresh, provenance) as write:
            yield write


def _provenance(path: Path, metadata: dict, where: str) -> dict | None:
    """Our provenance in `metadata`: a JSON string in a file's, an object in an index's."""
    value = metadata.get(PROVENANCE_KEY)
    if value is None:
        return None
    try:
        found = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise StreamavgError(f"{path}: corrupt streamavg provenance in {where}")
    return found


def _header_bytes(metadata: dict[str, str], entries: dict[str, _Entry]) -> bytes:
    """A header as the safetensors library writes one: length, compact UTF-8 JSON with
    `__metadata__` first, padded with spaces to a multiple of 8 bytes."""
    header: dict[str, object] = {METADATA: metadata}
    for name, e in entries.items():
        header[name] = {"dtype": e.code, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@contextmanager
def _written(
    outputs: dict[Path, _File], fresh: Collection[str], provenance: dict
) -> Iterator[Write]:
    """Write each output file laid out like its template file; yield `write(name, values,
    index)` filling the `fresh` tensors (blocks in any order, from any thread). The other
    tensors are copied from the templates, COPY_BYTES at a time."""
    fresh = set(fresh)
    targets: dict[str, tuple[OffsetWriter, int, tuple[int, ...]]] = {}
    places: dict[str, tuple[Path, int]] = {}
    buffer = np.empty(COPY_BYTES, np.uint8)
    with ExitStack() as stack:
        for path, template in outputs.items():
            metadata = {
                **(template.metadata or {}),
                PROVENANCE_KEY: json.dumps(provenance, sort_keys=True),
            }
            head = _header_bytes(metadata, template.entries)
            with open(path, "wb") as f:
                f.truncate(len(head) + template.size - template.data_start)
            writer = OffsetWriter(path, None)
            stack.callback(writer.close)
            writer.write(0, np.frombuffer(head, np.uint8))
            for name, e in template.entries.items():
                if name in fresh:
                    targets[name] = writer, len(head) + e.begin, e.shape
                    places[name] = path, len(head) + e.begin
                    continue
                for at in range(e.begin, e.end, COPY_BYTES):
                    chunk = buffer[: min(COPY_BYTES, e.end - at)]
                    template.read_into(name, chunk, at)
                    writer.write(len(head) + at, chunk)

        def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
            writer, start, shape = targets[name]
            writer.write_block(start, shape, index, values)

        write.targets = Targets(places, None)  # for writers in other processes
        yield write
