"""Ranking checkpoints by a monitored metric: its direction, and its values in a CSVLogger file.

Keras may not be imported on the averaging path, so the directions of Keras's built-in
metrics are a table here, by the names they log under (tests check it against Keras).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .choices import MODES
from .errors import StreamavgError, UsageError, option
from .formats import require_regular_file

# Keras 3's metrics with `_direction = "up"`, by compile() string and default name.
MAXIMISED = frozenset(
    {
        "accuracy", "acc", "binary_accuracy", "categorical_accuracy",
        "sparse_categorical_accuracy", "top_k_categorical_accuracy",
        "sparse_top_k_categorical_accuracy", "auc", "precision", "recall",
        "precision_at_recall", "recall_at_precision", "sensitivity_at_specificity",
        "specificity_at_sensitivity", "f1_score", "fbeta_score", "f_beta_score", "io_u",
        "binary_io_u", "mean_io_u", "one_hot_io_u", "one_hot_mean_io_u", "r2_score",
        "cosine_similarity", "pearson_correlation", "concordance_correlation",
    }
)  # fmt: skip
# ... and with `_direction = "down"`; names ending in "loss" are minimised too.
MINIMISED = frozenset(
    {
        "mean_squared_error", "mse", "mean_absolute_error", "mae",
        "mean_absolute_percentage_error", "mape", "mean_squared_logarithmic_error", "msle",
        "root_mean_squared_error", "logcosh", "log_cosh_error", "hinge", "squared_hinge",
        "categorical_hinge", "kl_divergence", "poisson", "binary_crossentropy", "bce",
        "categorical_crossentropy", "sparse_categorical_crossentropy",
    }
)  # fmt: skip


def snake_case(name: str) -> str:
    """Keras's `to_snake_case`, which maps compile() strings such as `MeanIoU` to classes.

    >>> snake_case("MeanIoU"), snake_case("MSE"), snake_case("val_auc")
    ('mean_io_u', 'mse', 'val_auc')
    """
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def check_mode(mode: str) -> str:
    """`mode` if it is auto, min or max."""
    if mode not in MODES:
        raise UsageError(f"{option('mode')} must be auto, min or max, got {mode!r}")
    return mode


def direction(monitor: str, mode: str = "auto") -> str:
    """`"min"` or `"max"`: `mode`, or for `auto` what Keras's monitor callbacks infer.

    As in Keras's `MonitorCallback._set_monitor_op`, `val_` is stripped; a loss is
    minimised, and a built-in metric goes its own way. A name neither tells is refused.

    >>> direction("val_loss"), direction("val_auc_2"), direction("auc", "min")
    ('min', 'max', 'min')
    """
    if check_mode(mode) != "auto":
        return mode
    name = monitor.removeprefix("val_")
    if name.endswith("loss"):
        return "min"
    # Keras numbers the default names of a metric class's later instances: `auc_2`.
    names = {name, snake_case(name), re.sub(r"_\d+$", "", name)}
    for table, way in ((MAXIMISED, "max"), (MINIMISED, "min")):
        if names & table:
            return way
    raise UsageError(
        f"{option('monitor', monitor)}: cannot tell whether higher or lower is better; "
        f"pass {option('mode', 'max')} or {option('mode', 'min')}"
    )


def read_log(path: str | os.PathLike, monitor: str) -> dict[int, float | None]:
    """`monitor`'s value for each epoch of a `keras.callbacks.CSVLogger` file.

    Keys are epochs as ModelCheckpoint numbers them (`{epoch}` is fit's 0-based epoch
    index plus one, the CSV's `epoch` column is that index). A repeated epoch, as
    `append=True` writes after a resumed run, takes its last row, like the checkpoint
    saved over. A value Keras wrote as `NA` (no validation that epoch) is None.
    """
    path = Path(path)
    require_regular_file(path)
    try:
        with open(path, newline="") as f:
            header = f.readline()
            separator = header[5:6] if header.startswith("epoch") else ","
            rows = list(csv.reader([header, *f], delimiter=separator or ","))
    except OSError as e:
        raise StreamavgError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error):
        rows = []
    if not rows or rows[0][:1] != ["epoch"]:
        raise StreamavgError(f"{path}: not a CSVLogger file (no 'epoch' column first)")
    columns = rows[0]
    if monitor not in columns:
        raise UsageError(
            f"{option('monitor', monitor)}: not logged in {path} "
            f"(columns: {', '.join(columns[1:])})"
        )
    column = columns.index(monitor)
    values: dict[int, float | None] = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            epoch = int(row[0])
            text = row[column] if column < len(row) else ""
            values[epoch + 1] = None if text in ("", "NA") else float(text)
        except (ValueError, IndexError):
            raise StreamavgError(f"{path}: line {line} is not a CSVLogger row") from None
    return values


def best_k(values: Sequence[float], k: int, way: str) -> list[int]:
    """Indices of the `k` best values, in their original order; NaN ranks worst, and of
    equal values the later (newer checkpoint) wins.

    >>> best_k([0.5, float("nan"), 0.3, 0.3, 0.9], 2, "min")
    [2, 3]
    >>> best_k([0.5, float("nan"), 0.3], 2, "max")
    [0, 2]
    """
    sign = 1 if way == "min" else -1

    def rank(i: int) -> tuple[bool, float, int]:
        nan = math.isnan(values[i])
        return nan, 0.0 if nan else sign * values[i], -i

    return sorted(sorted(range(len(values)), key=rank)[:k])
