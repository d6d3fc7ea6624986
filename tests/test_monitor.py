"""Metric directions: streamavg's table against Keras's own metrics and monitor callbacks."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from keras.src import ops
from keras.src.metrics import ALL_OBJECTS_DICT
from keras.src.utils.naming import to_snake_case

from streamavg.errors import UsageError
from streamavg.monitor import MAXIMISED, MINIMISED, direction, snake_case

# Metrics whose constructors need arguments, and those arguments.
REQUIRED = {
    "IoU": {"num_classes": 3, "target_class_ids": [0]},
    "OneHotIoU": {"num_classes": 3, "target_class_ids": [0]},
    "MeanIoU": {"num_classes": 3},
    "OneHotMeanIoU": {"num_classes": 3},
    "PrecisionAtRecall": {"recall": 0.5},
    "RecallAtPrecision": {"precision": 0.5},
    "SensitivityAtSpecificity": {"specificity": 0.5},
    "SpecificityAtSensitivity": {"sensitivity": 0.5},
}
BASES = (keras.metrics.Metric, keras.metrics.MeanMetricWrapper)  # no metric of their own


def keras_direction(metric: keras.metrics.Metric) -> str | None:
    return {"up": "max", "down": "min"}.get(getattr(metric, "_direction", None))


def ours(name: str) -> str | None:
    try:
        return direction(name)
    except UsageError:
        return None


def keras_metrics() -> dict[str, keras.metrics.Metric]:
    """Every name compile() takes as a metric string (but accuracy), with its metric."""
    return {
        name: cls(**REQUIRED.get(cls.__name__, {}))
        for name, cls in ALL_OBJECTS_DICT.items()
        if cls not in BASES
    }


METRICS = keras_metrics()


@pytest.mark.parametrize("name", sorted(METRICS))
def test_table_matches_every_keras_metric(name):
    """Each compile() string and each class's default name goes the metric's own way."""
    metric = METRICS[name]
    assert ours(name) == keras_direction(metric), name
    assert ours(metric.name) == keras_direction(metric), metric.name
    assert ours(f"val_{metric.name}") == keras_direction(metric)


def test_table_names_only_keras_metrics():
    """Nothing in the table that Keras would not log under that name."""
    known = {"accuracy", "acc"}
    for name, metric in METRICS.items():
        known |= {snake_case(name), metric.name}
    assert known >= MAXIMISED | MINIMISED
    assert not MAXIMISED & MINIMISED


def test_snake_case_is_keras_to_snake_case():
    for name in ALL_OBJECTS_DICT:
        assert snake_case(name) == to_snake_case(name)


COMPILED = ["mse", "mae", "accuracy", "acc", "auc", "categorical_crossentropy", "AUC"]
COMPILED += ["MeanSquaredError", "precision", "recall", "r2_score", "cosine_similarity"]
COMPILED += ["kl_divergence", keras.metrics.TruePositives()]


@pytest.fixture(scope="module")
def compiled() -> keras.Model:
    """A model compiled with metric strings, fit for one step so that they are built."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", metrics=COMPILED)
    x, y = np.ones((4, 3), "float32"), np.eye(2, dtype="float32")[[0, 1, 0, 1]]
    model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    return model


def test_auto_mode_agrees_with_keras_callbacks(compiled):
    """For every metric the compiled model logs, Keras's ModelCheckpoint(mode="auto")
    picks the direction streamavg picks, or both refuse."""
    logged = ["loss", *(m.name for m in compiled.metrics[1].metrics)]
    assert set(logged) >= {"mse", "acc", "AUC", "MeanSquaredError", "r2_score"}
    assert logged[-1].startswith("true_positives")  # a counter: no direction
    for name in logged:
        for monitor in (name, f"val_{name}"):
            callback = keras.callbacks.ModelCheckpoint("unused.keras", monitor=monitor)
            callback.set_model(compiled)
            try:
                callback._set_monitor_op()
            except ValueError:
                assert ours(monitor) is None, monitor
                continue
            assert ours(monitor) == {ops.less: "min", ops.greater: "max"}[callback.monitor_op]


def test_unknown_direction_is_refused():
    message = "monitor='val_f2': cannot tell whether higher or lower is better; "
    message += "pass mode='max' or mode='min'"
    with pytest.raises(UsageError) as e:
        direction("val_f2")
    assert str(e.value) == message
    assert direction("val_f2", "max") == "max"
    assert direction("val_out_loss") == "min"
