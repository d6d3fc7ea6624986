"""Tiny, deterministic Keras 3 training runs for the callback tests, and their references."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = (X @ RNG.normal(size=(4, 2)) + 0.1 * RNG.normal(size=(64, 2))).astype("float32")
VAL = (X[:16] + 0.5, Y[:16])
FIT = {"batch_size": 8, "verbose": 0, "shuffle": False}  # 8 steps per epoch


def make_model(*, dtype=None, batchnorm: bool = False, **optimizer_args) -> keras.Model:
    """A small MLP with fixed initial weights, compiled with SGD with momentum."""
    keras.utils.set_random_seed(0)
    middle = [keras.layers.BatchNormalization(dtype=dtype, name="bn")] if batchnorm else []
    layers = [
        keras.layers.Dense(8, activation="relu", dtype=dtype, name="hidden"),
        *middle,
        keras.layers.Dense(2, dtype=dtype, name="out"),
    ]
    model = keras.Sequential([keras.Input((4,)), *layers], name="mlp")  # the same paths each time
    optimizer = keras.optimizers.SGD(**{"learning_rate": 0.05, "momentum": 0.9, **optimizer_args})
    model.compile(optimizer=optimizer, loss="mse")
    return model


def make_unnamed_model(*, swap: bool = False) -> keras.Model:
    """An MLP with two hidden Dense(8 -> 8) layers and the names Keras generates, as a new
    process builds it (the names start afresh).

    `swap` creates those two layers in the other order, so they trade names (and paths)
    while the model's variable order, shapes and initial weights (seeded by position)
    stay the same: what an average matched by name would silently mix up.
    """
    keras.backend.clear_session()  # generated names start again from "dense"
    keras.utils.set_random_seed(0)
    order = [0, 2, 1, 3] if swap else [0, 1, 2, 3]
    layers = {
        i: keras.layers.Dense(
            2 if i == 3 else 8,
            activation=None if i == 3 else "relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed=i),
        )
        for i in order
    }
    model = keras.Sequential([keras.Input((4,)), *(layers[i] for i in range(4))])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="mse")
    return model


def weights(model: keras.Model, trainable_only: bool = True) -> dict[str, np.ndarray]:
    """The model's float variables by path, as float64 copies."""
    variables = model.trainable_variables if trainable_only else model.variables
    return {
        v.path: ops.convert_to_numpy(ops.cast(v, "float64"))
        for v in variables
        if "float" in str(v.dtype)
    }


def in_order(model: keras.Model) -> dict[int, np.ndarray]:
    """`weights(model)` by position, to compare models whose variable names differ."""
    return dict(enumerate(weights(model).values()))


class Recorder(keras.callbacks.Callback):
    """Records the weights (float64 copies) and the optimizer's `iterations` at the start
    of fit and after every batch."""

    def __init__(self, trainable_only: bool = True):
        super().__init__()
        self.trainable_only = trainable_only
        self.steps: list[dict[str, np.ndarray]] = []
        self.iterations: list[int] = []

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()

    def _record(self) -> None:
        self.steps.append(weights(self.model, self.trainable_only))
        self.iterations.append(int(ops.convert_to_numpy(self.model.optimizer.iterations)))


def fold(average: dict, new: dict, keep: float) -> dict:
    """The float64 reference update: keep * average + (1 - keep) * new."""
    return {k: keep * average[k] + (1 - keep) * new[k] for k in average}


def assert_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """Every array within `rtol` of the reference, relative to the reference's largest value."""
    assert got.keys() == want.keys()
    for k in want:
        scale = np.abs(want[k]).max()
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol * scale, err_msg=k)


def assert_equal(got: dict, want: dict) -> None:
    """Bit-for-bit equality of two dicts of arrays."""
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def reference(steps: list[dict], decay: float, *, warmup=False, every=1, start=0) -> dict:
    """The documented EMA over recorded weights: steps[0] is the start of fit."""
    average = steps[0]
    for s, w in enumerate(steps[1:], 1):
        t = s - start
        if t <= 0:
            average = dict(w)
        elif t % every == 0:
            d = min(decay, t / (9 + t)) if warmup else decay
            average = fold(average, w, d**every)
    return average


def shadow(ema) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in ema.averaged_weights().items()}
