"""A `.keras` archive built around an HDF5 file in place, so the weights are never copied.

The HDF5 file is written with a user block of HEADER bytes, which HDF5 leaves alone. The
weights member's zip header fills that block, so the HDF5 image itself is the member's
data; the template's other members and the central directory follow it. zipfile cannot
adopt bytes already in place, hence these few records by hand. Every record carries ZIP64
sizes, so one layout serves small and multi-gigabyte archives, and every test reads it.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from .errors import StreamavgError
from .formats import WEIGHTS_MEMBER

HEADER = 512  # the HDF5 user block: the smallest HDF5 allows, room for one zip header
_ZIP64, _PADDING = 0x0001, 0x5341  # extra-field ids: ZIP64 sizes; padding ("SA", ignored)
_VERSION = 45  # ZIP64
_MADE_BY = 3 << 8 | _VERSION  # on Unix: the external attributes are a file mode
_UTF8 = 0x800  # flag bit 11: the name is UTF-8
_FULL = 0xFFFFFFFF  # a 32-bit field whose value is in the ZIP64 extra field


def finish(template: Path, path: Path) -> None:
    """Make `path`, an HDF5 file written after a HEADER-byte user block, a `.keras` archive
    holding it as the weights member, then `template`'s other members."""
    try:
        with zipfile.ZipFile(template) as src:
            stamp = src.getinfo(WEIGHTS_MEMBER).date_time
            others = [
                (i.filename, i.date_time, src.read(i))
                for i in src.infolist()
                if i.filename != WEIGHTS_MEMBER
            ]
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as e:
        raise StreamavgError(f"{template}: corrupt .keras archive ({e})") from None
    with open(path, "r+b") as f:
        size = f.seek(0, 2) - HEADER
        crc = _crc(f, HEADER, size)
        f.seek(0)
        f.write(_local(WEIGHTS_MEMBER, crc, size, stamp, pad_to=HEADER))
        entries = [(WEIGHTS_MEMBER, stamp, crc, size, 0)]
        f.seek(0, 2)
        for name, date_time, data in others:
            entries.append((name, date_time, zlib.crc32(data), len(data), f.tell()))
            f.write(_local(name, entries[-1][2], len(data), date_time) + data)
        f.write(_directory(entries, f.tell()))


def _crc(f: BinaryIO, start: int, size: int) -> int:
    crc = 0
    f.seek(start)
    while chunk := f.read(min(1 << 20, size)):
        crc, size = zlib.crc32(chunk, crc), size - len(chunk)
    return crc


def _flags(name: str) -> int:
    return 0 if name.isascii() else _UTF8


def _dos(date_time: tuple[int, ...]) -> tuple[int, int]:
    year, month, day, hour, minute, second = date_time
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def _local(name: str, crc: int, size: int, date_time: tuple, pad_to: int = 0) -> bytes:
    """A local file header (stored, ZIP64 sizes), padded to `pad_to` bytes if given."""
    encoded = name.encode()
    extra = struct.pack("<HHQQ", _ZIP64, 16, size, size)
    if pad_to:
        gap = pad_to - 30 - len(encoded) - len(extra) - 4
        extra += struct.pack("<HH", _PADDING, gap) + bytes(gap)
    head = struct.pack(
        "<4s5H3I2H", b"PK\x03\x04", _VERSION, _flags(name), 0, *_dos(date_time), crc,
        _FULL, _FULL, len(encoded), len(extra),
    )  # fmt: skip
    return head + encoded + extra


def _directory(entries: list[tuple], start: int) -> bytes:
    """The central directory for `entries` (name, date_time, crc, size, offset) at `start`,
    with the ZIP64 end records and the classic end record after it."""
    records = b""
    for name, date_time, crc, size, offset in entries:
        encoded = name.encode()
        extra = struct.pack("<HH3Q", _ZIP64, 24, size, size, offset)
        records += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", _MADE_BY, _VERSION, _flags(name), 0,
            *_dos(date_time), crc, _FULL, _FULL, len(encoded), len(extra), 0, 0, 0,
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
