"""A byte range of a file as a read-only file object, for libraries that seek and read
(h5py, zipfile): a `.keras` archive's weights member in place, or an object in a store."""

from __future__ import annotations

import io
import os
from collections.abc import Callable


class Window(io.RawIOBase):
    """Read-only bytes [start, start+size) of a file, as a seekable file object for h5py
    and zipfile; `readinto(offset, buffer)` reads the file itself."""

    def __init__(self, readinto: Callable[[int, memoryview], int], start: int, size: int) -> None:
        self._readinto, self.start, self._size, self._pos = readinto, start, size, 0

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
        if not n or self._pos < 0:  # past the end (or a nonsense position): nothing
            return 0
        got = self._readinto(self.start + self._pos, memoryview(buf).cast("B")[:n])
        self._pos += got
        return got
