"""Write real training checkpoints in every format streamavg reads.

Usage: `python make_checkpoints.py DIR keras3|keras2|renamed|quantized`.

Each case is a directory of EPOCHS checkpoints from one short training run, saved the
way users save them (ModelCheckpoint, model.save, save_weights), by Keras 3 and by
tf_keras (Keras 2). The tests call this once per session, in a subprocess, so that
Keras 3 and tf_keras each get a fresh process-wide dtype policy. `renamed` and
`quantized` write the cases of RENAMED and QUANTIZED, for tests/test_matching.py only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np

EPOCHS = 5
FEATURES, CLASSES = 6, 3
# case name -> (policy, how the checkpoint is saved)
KERAS3 = {
    "k3-keras": ("float32", "model_{epoch}.keras"),
    "k3-weights": ("float32", "model_{epoch}.weights.h5"),
    "k3-h5": ("float32", "model_{epoch}.h5"),
    "k3-keras-bf16": ("bfloat16", "model_{epoch}.keras"),
    "k3-weights-f16": ("float16", "model_{epoch}.weights.h5"),
    "k3-h5-bf16": ("bfloat16", "model_{epoch}.h5"),
    "k3-weights-mixed": ("mixed_float16", "model_{epoch}.weights.h5"),
}
KERAS2 = {
    "k2-h5": ("float32", "model_{epoch:02d}.h5", False),
    "k2-weights": ("float32", "weights_{epoch:02d}.h5", True),
    "k2-h5-bf16": ("bfloat16", "model_{epoch:02d}.h5", False),
    "k2-h5-f16": ("float16", "model_{epoch:02d}.h5", False),
}
# Legacy .h5 runs resumed in new processes that named the layers differently: case ->
# (Keras, weights only). Epochs 1-2 name the layers dense, dense_1, dense_2; epoch 3
# (a second model in the process) dense_3, dense_4, dense_5; epochs 4-5 build the same
# layers in another order, so that dense_1 comes first: the names of epochs 1-2, crossed.
RENAMED = {
    "k3-h5-renamed": ("keras", False),
    "k2-h5-renamed": ("tf_keras", False),
    "k2-weights-renamed": ("tf_keras", True),
}
RENAMED_RUNS = {1: "in order", 3: "shifted", 4: "crossed"}  # first epoch -> how it names
# A float model trained for EPOCHS, quantized by model.quantize(mode) after each: case -> mode.
QUANTIZED = {"k3-int8": "int8", "k3-int4": "int4"}


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, FEATURES)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, 64)]
    return x, y


def build(keras, x: np.ndarray):
    """Normalization (with an int64 count), Dense, BatchNormalization, Dense: a bit of everything.

    tf_keras cannot load back its own bfloat16 Normalization ("No cast function available"),
    so that policy goes without it there.
    """
    layers = [keras.Input((FEATURES,))]
    if not (
        keras.__name__ == "tf_keras" and keras.mixed_precision.global_policy().name == "bfloat16"
    ):
        layers.append(keras.layers.Normalization())
        layers[-1].adapt(x)
    return keras.Sequential(
        [
            *layers,
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )


def keras3(root: Path) -> None:
    import keras

    x, y = data()
    for case, (policy, pattern) in KERAS3.items():
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(1)
        model = build(keras, x)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
        (root / case).mkdir(parents=True)
        target = str(root / case / pattern)
        if pattern.endswith(".h5") and not pattern.endswith(".weights.h5"):
            save = keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs, m=model, t=target: m.save(
                    t.format(epoch=epoch + 1)
                )
            )
        else:
            weights_only = pattern.endswith(".weights.h5")
            save = keras.callbacks.ModelCheckpoint(target, save_weights_only=weights_only)
        model.fit(x, y, epochs=EPOCHS, batch_size=16, callbacks=[save], verbose=0)
    keras.config.set_dtype_policy("float32")


def keras2(root: Path) -> None:
    import tf_keras as keras

    x, y = data()
    for case, (policy, pattern, weights_only) in KERAS2.items():
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(1)
        model = build(keras, x)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
        (root / case).mkdir(parents=True)
        save = keras.callbacks.ModelCheckpoint(
            str(root / case / pattern), save_weights_only=weights_only
        )
        model.fit(x, y, epochs=EPOCHS, batch_size=16, callbacks=[save], verbose=0)
    keras.mixed_precision.set_global_policy("float32")


def renamed_model(keras, order: str):
    """Two Dense layers of one shape, then the head, assembled `order`ly (see RENAMED)."""
    if order != "shifted":
        keras.backend.clear_session()  # the names start again from dense
    first, second = keras.layers.Dense(FEATURES), keras.layers.Dense(FEATURES)
    if order == "crossed":
        first, second = second, first
    head = keras.layers.Dense(CLASSES, activation="softmax")
    model = keras.Sequential([keras.Input((FEATURES,)), first, second, head])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
    return model


def renamed(root: Path) -> None:
    import importlib

    x, y = data()
    for case, (module, weights_only) in RENAMED.items():
        keras = importlib.import_module(module)
        keras.utils.set_random_seed(1)
        (root / case).mkdir(parents=True)
        weights, starts = None, sorted(RENAMED_RUNS)
        for start, stop in zip(starts, [*starts[1:], EPOCHS + 1], strict=True):
            model = renamed_model(keras, RENAMED_RUNS[start])
            if weights is not None:
                model.set_weights(weights)  # resumed, by position as Keras does
            for epoch in range(start, stop):
                model.fit(x, y, epochs=1, batch_size=16, verbose=0)
                path = str(root / case / f"model_{epoch}.h5")
                model.save_weights(path) if weights_only else model.save(path)
            weights = model.get_weights()


def quantized(root: Path) -> None:
    import keras

    x, y = data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "categorical_crossentropy")
    for case in QUANTIZED:
        (root / case).mkdir(parents=True)
    for epoch in range(1, EPOCHS + 1):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        for case, mode in QUANTIZED.items():
            copy = keras.models.clone_model(model)
            copy.set_weights(model.get_weights())
            copy.quantize(mode)
            copy.save(root / case / f"model_{epoch}.keras")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    root = Path(sys.argv[1])
    modes = {"keras3": keras3, "keras2": keras2, "renamed": renamed, "quantized": quantized}
    modes[sys.argv[2]](root)
