"""A progress bar over bytes, in binary units (KiB, MiB, GiB), on a terminal only."""

from __future__ import annotations

import sys

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done}/{size} [{elapsed}<{remaining}, {speed}]"


def binary_size(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps the number below 1024.

    >>> binary_size(512), binary_size(1536), binary_size(3 * 2**30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    for unit in UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {UNITS[-1]}"


def bytes_bar(total: int, desc: str):
    """A tqdm bar counting bytes up to `total`, or None off a terminal (tqdm is imported
    only then). tqdm's own scaling says "MB" and rates in powers of 1000, so the counts
    and the rate are formatted here."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
            d["done"], d["size"] = binary_size(d["n"]), binary_size(d["total"])
            d["speed"] = "?" if rate is None else f"{binary_size(rate)}/s"
            return d

    return Bar(total=total, desc=desc, bar_format=BAR_FORMAT)
