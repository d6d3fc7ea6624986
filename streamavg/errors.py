"""The two ways streamavg refuses work; the CLI turns each into one line on stderr.

Messages name options as the caller wrote them: `--max-memory` on the command line,
`max_memory` in Python, through :func:`option`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_COMMAND_LINE: ContextVar[bool] = ContextVar("streamavg_command_line", default=False)


class StreamavgError(Exception):
    """Bad input: a file that is missing, corrupt or does not match the others (exit 1)."""

    exit_code = 1


class UsageError(StreamavgError):
    """Bad arguments: an option out of range or an output that may not be written (exit 2)."""

    exit_code = 2


def option(name: str, value: object = None) -> str:
    """Option `name` (a keyword argument) as the caller spells it, with `value` if given.

    >>> option("max_memory"), option("overwrite", True)
    ('max_memory', 'overwrite=True')
    >>> with command_line():
    ...     option("max_memory"), option("overwrite", True)
    ('--max-memory', '--overwrite')
    """
    if _COMMAND_LINE.get():
        return "--" + name.replace("_", "-") + ("" if value in (None, True) else f" {value}")
    return name if value is None else f"{name}={value!r}"


def on_command_line() -> bool:
    """Whether options are named as flags here (inside :func:`command_line`)."""
    return _COMMAND_LINE.get()


@contextmanager
def command_line() -> Iterator[None]:
    """Within the block (and threads started with its context), options are named as flags."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


#: What a writer raises on a failed write (h5py wraps the system's error in these).
WRITE_ERRORS = (OSError, RuntimeError, KeyError, ValueError)


def system_errno(e: BaseException) -> int | None:
    """The operating system's error number behind `e`, also when HDF5 wraps it in text."""
    found = re.search(r"errno = (\d+)", str(e))
    return getattr(e, "errno", None) or (int(found[1]) if found else None)


def reason(e: BaseException) -> str:
    """The last clause of an HDF5 error, which names the cause without the call stack."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.rstrip(")").split("(", 1)[-1].strip() if "(" in text else text
