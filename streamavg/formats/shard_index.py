"""The JSON index of a sharded checkpoint, read and checked in one place: Keras's
`x.weights.json` manifest and Hugging Face's `model.safetensors.index.json` alike hold
`{"metadata": {...}, "weight_map": {key: shard file name, or a list of them}}`, with the
shards in the index's own folder.

Whatever a library could read otherwise than we do is refused in one line: a repeated key
(its last value wins there), a lone surrogate (UTF-8 cannot hold it), a shard name that
leaves the folder.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from ..errors import StreamavgError
from .base import check_same, identity, require_regular_file, stat_of

SHAPE = '{"metadata": {...}, "weight_map": {...}}'
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads lets "\ud800" through; UTF-8 cannot


class Kind(NamedTuple):
    """One kind of index: its file names' suffix, what messages call it, the most bytes it
    may hold, and whether a key may list several shards (Keras) or one only."""

    suffix: str
    what: str
    limit: int
    lists: bool = True


class ShardIndex(NamedTuple):
    """An index, read and checked: all of it, its metadata ({} if absent), each key's shard
    names (once each, in the order listed), and the file's status before it was read."""

    path: Path
    document: dict
    metadata: dict
    weight_map: dict[str, list[str]]
    stat: os.stat_result

    @property
    def shards(self) -> list[str]:
        """Every shard it lists, once, in the order first listed."""
        return list(dict.fromkeys(n for names in self.weight_map.values() for n in names))

    def check_unchanged(self) -> None:
        """Refuse an index rewritten since it was read."""
        check_same(self.path, identity(self.stat))


def read(path: Path, kind: Kind) -> ShardIndex:
    """The index at `path`, checked to be a regular file within the limit, UTF-8 JSON of
    `SHAPE`, each key naming a shard (or, if `kind.lists`, a list of them) by a plain file
    name; refused in one line otherwise."""
    require_regular_file(path)  # a FIFO would block the read
    st = stat_of(path)
    if st.st_size > kind.limit:
        raise StreamavgError(
            f"{path}: {kind.what} of {st.st_size:,} bytes, over the limit of {kind.limit:,}"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror})") from None
    document = parse_json(path, raw, kind.what)
    metadata = document.get("metadata", {}) if isinstance(document, dict) else None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not (isinstance(metadata, dict) and isinstance(weight_map, dict)):
        raise StreamavgError(f"{path}: corrupt {kind.what} (not {SHAPE})")
    listed = {key: _shards(path, key, value, kind.lists) for key, value in weight_map.items()}
    return ShardIndex(path, document, metadata, listed, st)


def parts(directory: Path, kind: Kind) -> dict[str, Path]:
    """The shards that the indexes of `kind` in `directory` list, each with its index. An
    index that cannot be read lists none (opening it refuses it)."""
    found: dict[str, Path] = {}
    for path in sorted(directory.glob(f"*{kind.suffix}")):
        with suppress(StreamavgError):
            found |= dict.fromkeys(read(path, kind).shards, path)
    return found


def parse_json(path: Path, raw: bytes, what: str) -> object:
    """`raw` as UTF-8 JSON, refused in one line as a corrupt `what` where it is not, or
    where a library could read it otherwise: a repeated key, a lone surrogate."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except _Repeated as e:
        raise StreamavgError(f"{path}: {e.args[0]}: listed twice") from None
    except RecursionError:
        raise StreamavgError(f"{path}: corrupt {what} (nested too deeply)") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError too
        raise StreamavgError(f"{path}: corrupt {what} (not UTF-8 JSON)") from None


class _Repeated(Exception):
    """A key met twice in one JSON object."""


def _unique(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a repeated key, and a lone surrogate in its keys, its text
    values and the text in its list values."""
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise _Repeated(key)
        for text in (key, *(value if isinstance(value, list) else (value,))):
            if isinstance(text, str) and not text.isascii() and _SURROGATE.search(text):
                raise ValueError("a lone surrogate")
        found[key] = value
    return found


def _shards(path: Path, key: str, value: object, lists: bool) -> list[str]:
    """The shard names `value` gives `key`, each a file name in the index's folder."""
    names = value if lists and isinstance(value, list) else [value]
    if not (names and all(isinstance(n, str) for n in names)):
        want = "a shard file name or a list of them" if lists else "a shard file name"
        raise StreamavgError(f"{path}: {key}: not {want}")
    for name in names:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise StreamavgError(f"{path}: {key}: {name!r} is not a file name in this folder")
    return list(dict.fromkeys(names))
