"""The numbers in checkpoint names: which count as epochs, and ModelCheckpoint templates.

`keras.callbacks.ModelCheckpoint` names a file `filepath.format(epoch=epoch + 1, **logs)`
(with `batch=` too when it saves every few batches). Epochs and batches are integers;
logged metrics are floats, which Python always writes with a fraction or an exponent
(`0.53`, `1.2e-05`, `-0.31`, `nan`, `inf`). So digits that can be read as a float are
a metric value, never an epoch, wherever they stand in the name; so are digits with a
percent sign (`{val_accuracy:.0%}` writes `81%`). A metric formatted as a whole number
(`{val_loss:.0f}`) cannot be told from an epoch: such names need a template.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from .remote import absolute, as_path

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5", ".weights.json", ".safetensors")
ORDER_FIELDS = ("epoch", "batch")  # the integers ModelCheckpoint formats; the rest are logs
# Digits joined by dots, with an exponent, or a word nan/inf: numbers as Python writes them.
_NUMBER = re.compile(
    r"(?<![a-z])(?:nan|inf)(?![a-z])%?|\d+(?:\.\d+)*(?:e[-+]\d+)?%?", re.IGNORECASE
)
_MAX_RUNS = 8  # more dot-separated runs than this make no epoch, only a version string
_INT = r"\d+"
_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf|NAN|INF)%?"


class Name(NamedTuple):
    """A name's integers, and its shape: integers written `#`, floats `~`.

    >>> readings("model-0.53-03")
    [Name(shape='model-~-#', numbers=(3,))]
    """

    shape: str
    numbers: tuple[int, ...]


def stem(name: str) -> str:
    """The name without its checkpoint suffix, whose "5" in ".h5" is no epoch."""
    for suffix in (".weights.h5", *CHECKPOINT_SUFFIXES):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def readings(text: str) -> list[Name]:
    """The ways to read the integers of `text` (a name without its suffix), usually one.

    Digits joined by dots are read with as few integers as possible, as Python writes
    floats (no leading zero but in `0.x`): `03.0.53` is epoch 3 and 0.53, while `3.0.53`
    reads both ways round (epoch 3 and 0.53, or 3.0 and epoch 53). A minus sign after a
    separator belongs to the float, so negative and positive values give one shape.

    >>> readings("weights.09-0.31"), readings("ckpt_-1.2e-05_ep10")[0].shape
    ([Name(shape='weights.#-~', numbers=(9,))], 'ckpt_~_ep#')
    >>> [r.numbers for r in readings("model.3.0.53")]
    [(3,), (53,)]
    """
    names = [Name("", ())]
    end = 0
    for m in _NUMBER.finditer(text):
        start = m.start()
        options = _read(m[0])
        if (
            options[0][0].startswith("~")
            and text[start - 1 : start] == "-"
            and not text[start - 2 : start - 1].isalnum()
        ):
            start -= 1
        names = [
            Name(f"{n.shape}{text[end:start]}{kinds}", (*n.numbers, *ints))
            for n in names
            for kinds, ints in options
        ]
        end = m.end()
    return [Name(n.shape + text[end:], n.numbers) for n in names]


def without_metrics(text: str) -> str:
    """`text` without its metric values (and the separator before each): the name of an
    average, which no one checkpoint's metrics describe.

    >>> without_metrics("model-0.53-05"), without_metrics("weights.09-1.2e-05")
    ('model-05', 'weights.09')
    """
    kept, end = [], 0
    for m in _NUMBER.finditer(text):
        if all(kinds == "~" for kinds, _ in _read(m[0])):
            kept.append(re.sub(r"[-_.]?-?$", "", text[end : m.start()]))
            end = m.end()
    return "".join(kept) + text[end:]


def _read(number: str) -> list[tuple[str, list[int]]]:
    """The readings of one number with the fewest integers: `03.0.53` -> [(`#.~`, [3])]."""
    mantissa, exponent, _ = number.lower().partition("e")
    runs = mantissa.split(".")
    if number.endswith("%") or mantissa in ("nan", "inf") or len(runs) > _MAX_RUNS:
        return [("~", [])]
    found = {}
    for units in _partitions(runs):
        kinds = ["~" if len(unit) == 2 else "#" for unit in units]
        if exponent:
            kinds[-1] = "~"
        ints = [int(u[0]) for u, kind in zip(units, kinds, strict=True) if kind == "#"]
        found[".".join(kinds)] = ints
    fewest = min(len(ints) for ints in found.values())
    return [(kinds, ints) for kinds, ints in found.items() if len(ints) == fewest]


def _partitions(runs: list[str]) -> Iterator[list[tuple[str, ...]]]:
    """Every way to group dot-separated runs into integers (one run) and floats (two runs,
    the first `0` or without a leading zero, as Python writes them)."""
    if not runs:
        yield []
        return
    for rest in _partitions(runs[1:]):
        yield [(runs[0],), *rest]
    if len(runs) > 1 and (runs[0] == "0" or not runs[0].startswith("0")):
        for rest in _partitions(runs[2:]):
            yield [(runs[0], runs[1]), *rest]


def common_dir(paths: Iterable[str | os.PathLike]) -> Path:
    """The deepest directory holding all `paths` (absolute; a folder in a store for URLs).

    >>> common_dir(["run/epoch_1/model.keras", "run/epoch_2/model.keras"]).name
    'run'
    """
    dirs = [absolute(as_path(p)).parent for p in paths]
    depth = 0
    for names in zip(*(d.parts for d in dirs), strict=False):  # the shortest's length
        if len(set(names)) > 1:
            break
        depth += 1
    first = dirs[0]
    return first.parents[len(first.parts) - depth - 1] if depth < len(first.parts) else first


def below(path: Path, root: Path) -> tuple[str, ...]:
    """The names of `path` below the directory `root` (see `common_dir`)."""
    return absolute(path).parts[len(root.parts) :]


class Template(NamedTuple):
    """A ModelCheckpoint `filepath` template, compiled to match the names it writes."""

    text: str
    pattern: re.Pattern
    depth: int  # how many trailing path components it names
    fields: frozenset[str]


def compile_template(text: str) -> Template:
    """Compile `text`, such as `ckpt.{epoch:02d}-{val_loss:.2f}.keras`, to match names.

    `{epoch}` and `{batch}` match integers, any other field a logged float, whatever
    the format spec. Raises ValueError, saying why, for a template Keras could not fill
    or one without an `{epoch}` or `{batch}` to order by.

    >>> t = compile_template("ckpt.{epoch:02d}-{val_loss:.2f}.keras")
    >>> match_template(t, Path("run/ckpt.03-0.53.keras"))
    {'epoch': 3, 'val_loss': 0.53}
    """
    parts, seen = [], set()
    relative = text.lstrip("/").removeprefix("./")
    for literal, field, spec, conversion in string.Formatter().parse(relative):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if not field.isidentifier() or conversion or "{" in (spec or ""):
            raise ValueError(f"{{{field}}} is not a plain field (such as {{epoch:02d}})")
        if field in seen:
            parts.append(f"(?P={field})")
            continue
        seen.add(field)
        parts.append(f"(?P<{field}>{_INT if field in ORDER_FIELDS else _FLOAT})")
    if not seen & set(ORDER_FIELDS):
        raise ValueError("needs an {epoch} or {batch} field to order the checkpoints by")
    return Template(text, re.compile("".join(parts)), relative.count("/") + 1, frozenset(seen))


def match_template(template: Template, path: Path) -> dict[str, float] | None:
    """The fields of `path`'s trailing components, or None if they do not match.

    Epochs and batches are ints; metrics are floats (a `%` spec divided by 100).
    """
    m = template.pattern.fullmatch("/".join(path.parts[-template.depth :]))
    if m is None:
        return None
    return {name: _value(name, text) for name, text in m.groupdict().items()}


def _value(field: str, text: str) -> float:
    if field in ORDER_FIELDS:
        return int(text)
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)
