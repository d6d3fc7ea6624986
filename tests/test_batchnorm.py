"""recalibrate_batchnorm: moving statistics become the mean of the per-batch statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops
from training import FIT, X, Y, make_model

from streamavg.callbacks import EMA, recalibrate_batchnorm


def batch_statistics(model: keras.Model, batches: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The float64 mean of the batch means and of the (biased) batch variances at the BN input."""
    hidden = keras.Model(model.inputs, model.get_layer("hidden").output)
    outs = [ops.convert_to_numpy(hidden(b)).astype(np.float64) for b in batches]
    return np.mean([o.mean(0) for o in outs], 0), np.mean([o.var(0) for o in outs], 0)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_statistics_are_the_mean_over_the_batches(as_dataset):
    model = make_model(batchnorm=True)
    model.fit(X, Y, epochs=1, callbacks=[EMA(decay=0.9)], **FIT)  # leaves the average in
    bn = model.get_layer("bn")
    before = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    data = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 64, 16)] if as_dataset else X
    used = recalibrate_batchnorm(model, data, steps=3, batch_size=16)
    assert used == 3
    mean, var = batch_statistics(model, [X[:16], X[16:32], X[32:48]])
    np.testing.assert_allclose(ops.convert_to_numpy(bn.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(bn.moving_variance), var, rtol=1e-5)
    assert bn.momentum == 0.99
    for a, b in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, ops.convert_to_numpy(b))


def test_no_batches_is_an_error_and_no_batchnorm_is_a_no_op():
    with pytest.raises(ValueError, match=r"^recalibrate_batchnorm got no batches$"):
        recalibrate_batchnorm(make_model(batchnorm=True), X[:0])
    assert recalibrate_batchnorm(make_model(), X) == 0
