"""The files that give a checkpoint's weights their meaning, compared across checkpoints.

An average of weights is meaningful only if every checkpoint reads them the same way:
the same architecture in the model config, the same vocabulary, the same tokenizer.
Those companion files must be the same in every checkpoint (JSON documents without the
keys that change from save to save; any other file byte for byte, a piece at a time),
or the run is refused, naming the file and its first difference; with
`companions="newest"`, the newest's are taken and a note says so.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from .choices import COMPANION_POLICIES
from .errors import StreamavgError, UsageError, option
from .formats.base import Companion, Reader

#: What to do with companion files that differ between checkpoints.
#: JSON keys that change from save to save without changing what the weights mean: tool
#: versions, dates, auto-generated layer names (tensors are matched on their own), Keras's
#: ids of shared objects (Python's `id()`), whether a layer was being trained (frozen, then
#: fine-tuned), the compile and training configuration (a learning rate changed by a
#: schedule).
VOLATILE = re.compile(
    r"^(name|date_saved|shared_object_id|trainable|compile_config|training_config"
    r"|_name_or_path|_commit_hash|.*_version)$"
)
MAX_JSON = 1 << 20  # bytes: a config is small; a larger JSON file (a tokenizer's) is compared
# byte for byte, a piece at a time, never held whole


def check_companions(checkpoints: Sequence[Reader], policy: str = "equal") -> list[str]:
    """Refuse checkpoints whose meaning-giving companions differ from the newest's (or,
    with `policy` "newest", return notes naming them); the newest comes last."""
    if policy not in COMPANION_POLICIES:
        raise UsageError(f"{option('companions')} must be one of {', '.join(COMPANION_POLICIES)}")
    newest = checkpoints[-1]
    ours = {c.name: c for c in newest.companions() if c.role == "meaning"}
    differing: dict[str, str] = {}
    for ck in checkpoints[:-1]:
        theirs = {c.name: c for c in ck.companions() if c.role == "meaning"}
        for name in sorted(ours.keys() | theirs.keys()):
            if name in differing:
                continue
            if name not in theirs or name not in ours:
                where = ck.path if name not in theirs else newest.path
                why = f"{where}: {name}: missing (present in {_other(ck, newest, where)})"
            else:
                why = _difference(theirs[name], ours[name])
                why = why and f"{ck.path}: {name}: {why} (in {newest.path})"
            if why is None:
                continue
            if policy == "equal":
                raise StreamavgError(
                    f"{why}; the weights would be averaged across different models (pass "
                    f"{option('companions', 'newest')} to take the newest's)"
                )
            differing[name] = ck.path
    return [
        f"{name} differs in {path}: taken from the newest, {newest.path}"
        for name, path in differing.items()
    ]


def _other(a: Reader, b: Reader, where: object) -> object:
    return b.path if where == a.path else a.path


def _difference(mine: Companion, ref: Companion) -> str | None:
    """How companion `mine` differs from `ref`: the first differing JSON key, or the
    first differing byte; None if they are the same."""
    if mine.json and ref.json and max(mine.size, ref.size) <= MAX_JSON:
        a, b = _document(mine), _document(ref)
        if a is not None and b is not None:  # else not JSON: compared byte for byte
            return _compare(a, b, "")
    if mine.size != ref.size:
        return f"{mine.size:,} bytes here, {ref.size:,}"
    offset = 0
    for x, y in itertools.zip_longest(_pieces(mine), _pieces(ref), fillvalue=b""):
        if x != y:
            at = next(i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q)
            return f"differs from byte {offset + at:,}"
        offset += len(x)
    return None


def _pieces(c: Companion) -> Iterator[bytes]:
    """The bytes of `c` in pieces of one size (the sources' pieces may differ)."""
    size, pending = 1 << 20, b""
    for chunk in c.chunks():
        pending += chunk
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _document(c: Companion) -> Any:
    """The JSON document `c` holds, or None if it is not JSON."""
    return _decoded(b"".join(c.chunks()).decode("utf-8", "replace"))


def _compare(a: Any, b: Any, path: str) -> str | None:
    """The first place where JSON documents `a` and `b` differ (see `_first_difference`)."""
    return _first_difference(a, b, path, (_names(a), _names(b)))


def _names(document: Any) -> dict[str, int]:
    """The values of the document's `name` keys, numbered in the order they come: a layer
    named `dense_2` in one document and `dense` in another, at the same place, is the same
    layer (Keras names layers by how many were built before in that process)."""
    found: dict[str, int] = {}
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            name = value.get("name")
            if isinstance(name, str):
                found.setdefault(name, len(found))
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return found


def _first_difference(
    a: Any, b: Any, path: str, names: tuple[dict[str, int], dict[str, int]]
) -> str | None:
    """The first place where JSON values `a` and `b` differ, outside VOLATILE keys; a
    string that names a layer matches the name of the layer at the same place."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if VOLATILE.match(str(key)):
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                here, there = a.get(key, _MISSING), b.get(key, _MISSING)
                return f"{where} is {_short(here)} here, {_short(there)}"
            found = _first_difference(a[key], b[key], where, names)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path or 'the document'} has {len(a)} items here, {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{i}]", names)
            if found:
                return found
        return None
    if isinstance(a, str) and isinstance(b, str) and a != b and a[:1] + b[:1] in ("{{", "[["):
        inner = _decoded(a), _decoded(b)  # a document kept as a string (Orbax's config)
        if None not in inner:
            return _compare(*inner, path)
    if isinstance(a, str) and isinstance(b, str) and names[0].get(a, -1) == names[1].get(b, -2):
        return None  # one layer, named differently
    if a != b or type(a) is not type(b):
        return f"{path or 'the document'} is {_short(a)} here, {_short(b)}"
    return None


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


_MISSING = object()


def _short(value: Any) -> str:
    """A JSON value as a message shows it: cut short if long, `missing` if absent."""
    if value is _MISSING:
        return "missing"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
