"""Outputs in object storage (`s3://`, `gs://`, any protocol fsspec knows), through
fsspec: the average is written to a local temporary file, then uploaded whole. An object
store publishes an upload only once it is complete, so no reader sees part of it.

Credentials and endpoints come from where the protocol's library looks (`AWS_*`,
`AWS_ENDPOINT_URL`, fsspec's configuration). Needs the `[remote]` extra.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import StreamavgError, UsageError, option

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike | None) -> bool:
    return path is not None and bool(_URL.match(os.fspath(path)))


def _filesystem(url: str):
    if url.split("://", 1)[0].lower() in ("http", "https"):
        raise UsageError(f"{url}: HTTP is read-only; write to object storage (s3://, gs://, ...)")
    try:
        import fsspec
    except ImportError:
        raise UsageError(
            f"{url}: remote storage needs the [remote] extra: pip install 'streamavg[remote]'"
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # the protocol's package is missing, or unknown
        raise UsageError(f"{url}: {e}") from None


def _error(url: str, e: BaseException) -> StreamavgError:
    """One line for what the store answered."""
    if type(e).__name__ == "NoCredentialsError":
        why = "no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or fsspec's config)"
    elif isinstance(e, PermissionError):
        why = "access denied"
    elif isinstance(e, FileNotFoundError):
        why = "no such bucket or folder"
    else:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return StreamavgError(f"{url}: {why}")


def check_destination(url: str, overwrite: bool) -> None:
    """Refuse, before any work, an object that exists (without `overwrite`) or a store that
    cannot be reached."""
    fs, path = _filesystem(url)
    try:
        exists = fs.exists(path)
    except Exception as e:  # the store's own errors, from another library
        raise _error(url, e) from None
    if exists and not overwrite:
        raise UsageError(f"{url}: already exists (pass {option('overwrite', True)} to replace it)")


def upload(local: Path, url: str) -> None:
    """Put the finished file `local` at `url`, as one object."""
    fs, path = _filesystem(url)
    try:
        fs.put_file(str(local), path)
    except Exception as e:
        raise _error(url, e) from None
