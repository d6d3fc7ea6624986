"""Scoring averaged tensors on held-out data with Keras, for `streamavg sweep` (imports Keras).

The data file is an `.npz` holding two arrays of equal length: `x`, the inputs, and `y`,
the targets in the form the checkpoint's compiled loss expects. The score is one of the
metrics the checkpoint was compiled with, as `model.evaluate` reports it, and whether
higher is better comes from Keras too (or from `mode`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import StreamavgError, UsageError, option
from .formats import SUFFIXES, open_checkpoint, require_regular_file
from .monitor import check_mode

ARCHITECTURES = (
    "keras",
    "keras-dir",
    "legacy-h5",
)  # the formats that hold a model, not just weights


def load_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The `x` and `y` arrays of an `.npz` file, checked; never unpickles anything."""
    require_regular_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise StreamavgError(f"{path}: no array {missing[0]!r} (needs 'x' and 'y')")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise StreamavgError(f"{path}: not an .npz file of arrays x and y ({e})") from None
    if not len(x) or len(x) != len(y):
        raise StreamavgError(f"{path}: x has {len(x)} rows and y {len(y)}; needs equal, non-zero")
    return x, y


def keras_scorer(
    newest: str | os.PathLike,
    data: str | os.PathLike,
    metric: str | None = None,
    mode: str = "auto",
) -> tuple[Callable[[dict[str, np.ndarray]], float], str, bool]:
    """An `evaluate` for `sweep` and `greedy_soup`, built once from the newest checkpoint.

    Returns the function, the metric's name and whether higher is better. The default
    metric is accuracy if compiled in, else the loss. `mode="auto"` takes the direction
    from Keras, as its monitor callbacks do; "min" and "max" set it.
    """
    check_mode(mode)
    keras = import_keras("streamavg sweep")
    with open_checkpoint(newest) as ck:
        if ck.format not in ARCHITECTURES:
            raise UsageError(
                f"{newest}: a {ck.format} file holds no model to evaluate; "
                "sweep needs .keras or full-model .h5 checkpoints"
            )
        ck.check_heaps()  # Keras is about to decode its attributes
    x, y = load_data(data)
    try:
        model = keras.saving.load_model(newest, safe_mode=True)
    except (ValueError, TypeError) as e:  # safe mode refuses code: lambdas, custom objects
        reason = str(e).split(". ")[0].strip()
        raise StreamavgError(f"{newest}: cannot load the model in safe mode ({reason})") from None
    if not getattr(model, "compiled", False):
        raise UsageError(f"{newest}: the model was saved without compile(); no loss to evaluate")

    def score(x, y) -> dict[str, float]:
        try:
            return model.evaluate(x, y, return_dict=True, verbose=0)
        except Exception as e:  # any failure of Keras on the user's data: say which, in a line
            raise StreamavgError(
                f"{data}: Keras cannot evaluate {Path(newest).name} on x and y "
                f"({type(e).__name__}: {_first_line(e)})"
            ) from None

    names = list(score(x[:1], y[:1]))
    metric = metric or ("accuracy" if "accuracy" in names else "loss")
    if metric not in names:
        raise UsageError(
            f"{option('metric')} {metric}: not among the model's metrics ({', '.join(names)})"
        )
    maximize = mode == "max" if mode != "auto" else higher_is_better(model, metric)

    def evaluate(tensors: dict[str, np.ndarray]) -> float:
        with open_checkpoint(newest) as template, tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"average{SUFFIXES[template.format]}"
            # The template's optimizer state comes along, so Keras finds what it expects.
            with template.write_like(
                path, tensors, optimizer=True, provenance={}, overwrite=False
            ) as write:
                for name, values in tensors.items():
                    write(name, values)
            model.load_weights(path / template.files[0] if template.folder else path)
        return float(score(x, y)[metric])

    return evaluate, metric, maximize


def higher_is_better(model, metric: str) -> bool:
    """The direction Keras's monitor callbacks take for `metric`: losses go down, and a
    compiled metric says which way it goes; anything else is refused, asking for a mode."""
    from .callbacks._keras_compat import metric_direction

    name = metric.removeprefix("val_")
    if name == "loss" or name.endswith("_loss"):
        return False
    for tracker in model.metrics:
        for m in getattr(tracker, "metrics", [tracker]):  # compiled metrics sit in containers
            direction = metric_direction(m) if m.name == name else None
            if direction in ("up", "down"):
                return direction == "up"
    raise UsageError(
        f"{option('metric', metric)}: cannot tell whether higher or lower is better; "
        f"pass {option('mode', 'max')} or {option('mode', 'min')}"
    )


def import_keras(feature: str):
    """Keras, or one line saying which extra `feature` needs.

    TensorFlow's C++ start-up lines (written before any log level applies) are kept off
    stderr while it loads, so that stderr holds streamavg's own lines only.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _quiet_stderr():
            import keras
    except ImportError:
        raise UsageError(f"{feature} needs Keras: pip install 'streamavg[keras]'") from None
    return keras


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (C++ code writes to it directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _first_line(e: BaseException) -> str:
    """The line of a Keras error that says what went wrong: Keras wraps the cause between
    "Exception encountered when calling ..." and a list of the call's arguments."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    if lines and lines[0].startswith("Exception encountered"):
        cause = lines[1:2]
        lines = cause if cause and not cause[0].startswith("Arguments received") else lines
    return lines[0] if lines else "no message"
