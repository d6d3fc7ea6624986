"""Recompute BatchNorm statistics for averaged weights (Izmailov et al.'s SWA `bn_update`)."""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
from keras import ops

from . import _keras_compat as compat


def recalibrate_batchnorm(
    model: keras.Model, data, steps: int | None = None, *, batch_size: int = 32
) -> int:
    """Reset every BatchNormalization layer's moving statistics and re-estimate them on `data`.

    Averaged weights do not match statistics gathered along the way, so this runs the model
    in training mode over `data` and sets each moving mean and variance to the plain mean of
    the per-batch statistics. Nothing else changes: no weights are trained.

    `data` is an array of inputs (batched by `batch_size`) or an iterable of batches, each
    the inputs or an `(x, ...)` tuple, such as a `tf.data.Dataset`. `steps` caps the number
    of batches. Returns the number of batches used.

    >>> recalibrate_batchnorm(model, x_train, steps=100)  # doctest: +SKIP
    """
    compat.require_supported_keras()
    layers = [
        layer
        for layer in compat.sublayers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        mean, variance = layer.moving_mean, layer.moving_variance
        mean.assign(ops.zeros(mean.shape, mean.dtype))
        variance.assign(ops.ones(variance.shape, variance.dtype))
    count = 0
    try:
        for count, x in enumerate(_batches(data, batch_size, steps), 1):
            for layer in layers:
                layer.momentum = (count - 1) / count  # a cumulative mean over the batches
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not count:
        raise ValueError("recalibrate_batchnorm got no batches")
    return count


def _batches(data, batch_size: int, steps: int | None) -> Iterable:
    """Input batches from an array or an iterable of batches, at most `steps` of them."""
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "dtype")):
        batches = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    else:
        batches = (b[0] if isinstance(b, (tuple, list)) else b for b in data)
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            return
        yield batch
