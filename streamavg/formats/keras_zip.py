"""Keras 3 `.keras` archives: the weights member read in place, and an output archive
built around an HDF5 file in place, so the weights are never copied.

The member is stored uncompressed, so the reader opens it as a window on the archive's
file (`_Window`) and reads tensors at their offsets; a compressed member (not as Keras
writes it) is decompressed on the fly.

On output, the HDF5 file is written with a user block of HEADER bytes, which HDF5 leaves
alone. The weights member's zip header fills that block, so the HDF5 image itself is the
member's data; the template's other members and the central directory follow it.
zipfile cannot adopt bytes already in place, hence these few records by hand. The
other members are copied as the template stores them (compressed or not), a piece at a
time. Every record carries ZIP64 sizes, so one layout serves small and multi-gigabyte
archives, and every test reads it.
The member's CRC-32 is put together from the CRCs of the pieces as they were written
(`crc32_combine`), so a multi-gigabyte image is not read back for it.
"""

from __future__ import annotations

import functools
import os
import struct
import zipfile
import zlib
from collections.abc import Collection, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..errors import StreamavgError
from ..remote import as_path
from . import hdf5
from .base import Companion, LocalFile, Window, Write, open_file

SUFFIXES = {"keras": ".keras"}  # Keras 3 zip: config.json, metadata.json, model.weights.h5
ACCEPTED = {"keras": (".keras",)}
MAGIC = b"PK\x03\x04"
WEIGHTS_MEMBER = "model.weights.h5"
HEADER = 512  # the HDF5 user block: the smallest HDF5 allows, room for one zip header
JSON_MEMBERS = ("config.json", "metadata.json")  # the architecture, and what saved it
CHUNK = 1 << 20  # bytes of a member read, copied or decompressed at a time
_ZIP64, _PADDING = 0x0001, 0x5341  # extra-field ids: ZIP64 sizes; padding ("SA", ignored)
_VERSION = 45  # ZIP64
_MADE_BY = 3 << 8 | _VERSION  # on Unix: the external attributes are a file mode
_UTF8 = 0x800  # flag bit 11: the name is UTF-8
_FULL = 0xFFFFFFFF  # a 32-bit field whose value is in the ZIP64 extra field
_POLY = 0xEDB88320  # CRC-32's polynomial, bit-reversed as zlib computes it


class Archive(hdf5.Checkpoint):
    """An open `.keras` archive: the HDF5 reader over its weights member, in place."""

    def __init__(
        self, path: str | os.PathLike, *, optimizer: bool = False, like: Archive | None = None
    ) -> None:
        path = as_path(path)
        source = open_file(path)
        try:
            member, size = _open_member(path, source)
        except BaseException:
            source.close()
            raise
        start = member.start if isinstance(member, Window) else None
        image = (member, source, start, size)
        super().__init__(path, optimizer=optimizer, image=image, format="keras", like=like)

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        checksums: dict[int, tuple[int, int]] = {}
        with hdf5.h5_like(
            self,
            tmp,
            fresh,
            optimizer=optimizer,
            provenance=provenance,
            userblock=HEADER,
            checksums=checksums,
        ) as write:
            yield write
        finish(self.path, tmp, checksums, self._source)

    def companions(self) -> list[Companion]:
        """The members beside the weights: config.json and metadata.json (JSON) and the
        assets (vocabularies) give the weights their meaning; any other is copied."""
        with _errors(self.path), zipfile.ZipFile(self._source.handle()) as zf:
            members = sorted(zf.infolist(), key=lambda m: m.filename)
        return [
            Companion(
                m.filename,
                m.file_size,
                functools.partial(self._chunks, m.filename),
                "meaning"
                if m.filename in JSON_MEMBERS or m.filename.startswith("assets/")
                else "copy",
                json=m.filename in JSON_MEMBERS,
            )
            for m in members
            if m.filename != WEIGHTS_MEMBER and not m.is_dir()
        ]

    def _chunks(self, name: str) -> Iterator[bytes]:
        """Member `name`'s data, decompressed CHUNK bytes at a time (its CRC-32 checked)."""
        with _errors(self.path), zipfile.ZipFile(self._source.handle()) as zf, zf.open(name) as m:
            while chunk := m.read(CHUNK):
                yield chunk


def claims(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def open_checkpoint(path: Path, *, optimizer: bool = False, like: Archive | None = None) -> Archive:
    return Archive(path, optimizer=optimizer, like=like)


def averaged(path: Path) -> bool:
    """Whether the archive at `path` is an earlier streamavg output (see `hdf5.averaged`)."""
    try:
        with closing(open_file(path)) as source:
            return hdf5.averaged(_open_member(path, source)[0])
    except StreamavgError:
        return False


def _open_member(path: Path, source: LocalFile) -> tuple[BinaryIO, int]:
    """Open the weights member of the `.keras` zip `source` in place, without extracting it."""
    try:
        with zipfile.ZipFile(source.handle()) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise StreamavgError(f"{path}: corrupt .keras archive ({e})") from None
    check_members(path, members)
    info = next((m for m in members if m.filename == WEIGHTS_MEMBER), None)
    if info is None:
        raise StreamavgError(f"{path}: .keras archive has no {WEIGHTS_MEMBER}")
    if info.compress_type != zipfile.ZIP_STORED:  # not as Keras writes it; decompress on the fly
        return zipfile.ZipFile(source.handle()).open(info), info.file_size
    return source.window(_data_start(path, source, info), info.file_size), info.file_size


def _data_start(path: Path, source: LocalFile, info: zipfile.ZipInfo) -> int:
    """Where member `info`'s stored bytes start in archive `source`: after its local header."""
    header = source.read(info.header_offset, 30)
    if len(header) < 30 or header[:4] != MAGIC:
        raise StreamavgError(f"{path}: corrupt .keras archive (bad local header)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > source.size:
        raise StreamavgError(f"{path}: corrupt .keras archive (truncated {info.filename})")
    return start


@contextmanager
def _errors(path: Path) -> Iterator[None]:
    """Name archive `path` as corrupt when zipfile cannot read it."""
    try:
        yield
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError, RuntimeError) as e:
        raise StreamavgError(f"{path}: corrupt .keras archive ({e})") from None


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
        if m.file_size > (
            m.compress_size if stored else hdf5.MAX_EXPANSION * max(1, m.compress_size)
        ):
            raise StreamavgError(
                f"{path}: {name}: declares {m.file_size:,} bytes from {m.compress_size:,} "
                "(a zip bomb?)"
            )


class Member(NamedTuple):
    """A member of the output archive, as its zip records describe it."""

    name: str
    date_time: tuple[int, ...]
    method: int  # zipfile.ZIP_STORED, ZIP_DEFLATED...
    crc: int  # of the uncompressed data
    compressed: int  # bytes stored
    size: int  # bytes of data
    offset: int  # of its local header


def finish(
    template: Path, path: Path, written: Mapping[int, tuple[int, int]], source: LocalFile
) -> None:
    """Make `path`, an HDF5 file written after a HEADER-byte user block, a `.keras` archive
    holding it as the weights member, then the other members of archive `template` (opened
    as `source`), copied as stored. `written` maps the offset of byte ranges already
    checksummed to their (size, CRC-32); they are not read."""
    with _errors(template), zipfile.ZipFile(source.handle()) as src:
        stamp = src.getinfo(WEIGHTS_MEMBER).date_time
        others = [i for i in src.infolist() if i.filename != WEIGHTS_MEMBER]
    with open(path, "r+b") as f:
        size = f.seek(0, 2) - HEADER
        crc = _crc(f, HEADER, HEADER + size, written)
        entries = [Member(WEIGHTS_MEMBER, stamp, zipfile.ZIP_STORED, crc, size, size, 0)]
        f.seek(0)
        f.write(_local(entries[0], pad_to=HEADER))
        f.seek(0, 2)
        for i in others:
            entries.append(
                Member(i.filename, i.date_time, i.compress_type, i.CRC, i.compress_size,
                       i.file_size, f.tell())
            )  # fmt: skip
            f.write(_local(entries[-1]))
            _copy(template, source, i, f)
        f.write(_directory(entries, f.tell()))


def _copy(template: Path, source: LocalFile, info: zipfile.ZipInfo, f: BinaryIO) -> None:
    """Append member `info`'s stored bytes to `f`, CHUNK bytes at a time; where they are
    stored or deflated (as zipfile writes them), check on the way that their data has its
    CRC-32, as a read of the member would."""
    start = _data_start(template, source, info)
    end = start + info.compress_size
    deflated = info.compress_type == zipfile.ZIP_DEFLATED
    inflate, crc = zlib.decompressobj(-zlib.MAX_WBITS), 0
    for at in range(start, end, CHUNK):
        size = min(CHUNK, end - at)
        piece = source.read(at, size)
        if len(piece) < size:
            raise StreamavgError(f"{template}: corrupt .keras archive (truncated {info.filename})")
        f.write(piece)
        try:
            while deflated and piece:  # at most CHUNK bytes of data at a time
                crc = zlib.crc32(inflate.decompress(piece, CHUNK), crc)
                piece = inflate.unconsumed_tail
            crc = zlib.crc32(piece, crc)  # stored: the piece is the data
        except zlib.error as e:
            raise StreamavgError(f"{template}: corrupt .keras archive ({e})") from None
    crc = zlib.crc32(inflate.flush(), crc)
    if info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and crc != info.CRC:
        raise StreamavgError(f"{template}: corrupt .keras archive (bad CRC-32 of {info.filename})")


def _crc(f: BinaryIO, start: int, end: int, written: Mapping[int, tuple[int, int]]) -> int:
    """The CRC-32 of bytes [start, end) of `f`, reading only the gaps between `written`."""
    crc = 0
    for offset, (size, part) in sorted(written.items()):
        crc = crc32_combine(_crc_read(f, start, offset, crc), part, size)
        start = offset + size
    return _crc_read(f, start, end, crc)


def _crc_read(f: BinaryIO, start: int, end: int, crc: int) -> int:
    f.seek(start)
    while start < end and (chunk := f.read(min(1 << 20, end - start))):
        crc, start = zlib.crc32(chunk, crc), start + len(chunk)
    return crc


def crc32_combine(crc1: int, crc2: int, size2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B), as zlib's crc32_combine.

    >>> crc32_combine(zlib.crc32(b"average"), zlib.crc32(b"d"), 1) == zlib.crc32(b"averaged")
    True
    """
    return _multiply(_shift(size2), crc1) ^ crc2


@functools.lru_cache(maxsize=16)  # most pieces share a size
def _shift(size: int) -> int:
    """x ** (8 * size) modulo the CRC polynomial: appending `size` bytes to a message."""
    power, k = 1 << 31, 3  # x ** 0 (bit-reversed); 8 * size is size * 2 ** 3
    while size:
        if size & 1:
            power = _multiply(_square_power(k), power)
        size, k = size >> 1, k + 1
    return power


@functools.cache
def _square_power(k: int) -> int:
    """x ** (2 ** k) modulo the CRC polynomial (bit-reversed): squarings, computed once."""
    return 1 << 30 if k == 0 else _multiply(_square_power(k - 1), _square_power(k - 1))


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both bit-reversed (zlib's multmodp)."""
    product = 0
    for bit in range(31, -1, -1):
        if a >> bit & 1:
            product ^= b
        b = b >> 1 ^ _POLY if b & 1 else b >> 1
    return product


def _flags(name: str) -> int:
    return 0 if name.isascii() else _UTF8


def _dos(date_time: tuple[int, ...]) -> tuple[int, int]:
    year, month, day, hour, minute, second = date_time
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def _local(m: Member, pad_to: int = 0) -> bytes:
    """A local file header (ZIP64 sizes), padded to `pad_to` bytes if given."""
    encoded = m.name.encode()
    extra = struct.pack("<HHQQ", _ZIP64, 16, m.size, m.compressed)
    if pad_to:
        gap = pad_to - 30 - len(encoded) - len(extra) - 4
        extra += struct.pack("<HH", _PADDING, gap) + bytes(gap)
    head = struct.pack(
        "<4s5H3I2H", b"PK\x03\x04", _VERSION, _flags(m.name), m.method, *_dos(m.date_time),
        m.crc, _FULL, _FULL, len(encoded), len(extra),
    )  # fmt: skip
    return head + encoded + extra


def _directory(entries: list[Member], start: int) -> bytes:
    """The central directory for `entries` at `start`, with the ZIP64 end records and the
    classic end record after it."""
    records = b""
    for m in entries:
        encoded = m.name.encode()
        extra = struct.pack("<HH3Q", _ZIP64, 24, m.size, m.compressed, m.offset)
        records += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", _MADE_BY, _VERSION, _flags(m.name), m.method,
            *_dos(m.date_time), m.crc, _FULL, _FULL, len(encoded), len(extra), 0, 0, 0,
            0o100644 << 16, _FULL,
        ) + encoded + extra  # fmt: skip
    count, end64 = len(entries), start + len(records)
    return (
        records
        + struct.pack(
            "<4sQ2H2I4Q", b"PK\x06\x06", 44, _VERSION, _VERSION, 0, 0, count, count,
            len(records), start,
        )
        + struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1)
        + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, _FULL, _FULL, 0)
    )  # fmt: skip
