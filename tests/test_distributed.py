"""The EMA under distributed training on two devices: `keras.distribution` (data- and
model-parallel) on JAX, `tf.distribute.MirroredStrategy` on TensorFlow.

Runs where `test_backends.py` starts it, in a process of its own with two devices: JAX's
host devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`), or TensorFlow's CPU
split in two logical devices (`STREAMAVG_TEST_DEVICES=2`, which must act before TensorFlow
starts, so not in a process that ran other tests first). Skipped elsewhere.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from training import (
    FIT,
    VAL,
    Recorder,
    X,
    Y,
    assert_close,
    assert_equal,
    make_model,
    reference,
    shadow,
)

from streamavg.callbacks import EMA

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    DEVICES = jax.devices()
elif BACKEND == "tensorflow":
    import tensorflow as tf

    if os.environ.get("STREAMAVG_TEST_DEVICES") == "2":
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    DEVICES = tf.config.list_logical_devices("CPU")
else:
    pytest.skip(f"no distributed training tested on {BACKEND}", allow_module_level=True)
if len(DEVICES) < 2:
    pytest.skip("needs two devices, as test_backends.py sets up", allow_module_level=True)

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")


def model_parallel() -> keras.distribution.ModelParallel:
    """The hidden layer's kernel split across both devices by its columns; the rest replicated."""
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], DEVICES[:2])
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["mlp/hidden/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")


@pytest.fixture(params=["data", "model"])
def distributed(request):
    if request.param == "data":
        distribution = keras.distribution.DataParallel(devices=DEVICES[:2])
    else:
        distribution = model_parallel()
    keras.distribution.set_distribution(distribution)
    yield request.param
    keras.distribution.set_distribution(None)


def trained_weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}


@jax_only
def test_the_ema_matches_the_reference_leaves_training_untouched_and_is_laid_out_as_the_weights(
    distributed,
):
    plain = make_model()
    plain.fit(X, Y, epochs=2, **FIT)
    model, rec, ema = make_model(), Recorder(), EMA(decay=0.9, final_weights="raw")
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    assert_close(shadow(ema), reference(rec.steps, 0.9))
    assert_equal(trained_weights(model), trained_weights(plain))
    for s, v in zip(ema._shadow, ema._tracked, strict=True):  # laid out as its weight
        assert s.value.sharding.is_equivalent_to(v.value.sharding, len(v.shape)), v.path
    kernel = ema._shadow[0].value.sharding
    assert kernel.is_fully_replicated == (distributed == "data")
    assert kernel.shard_shape((4, 8)) == ((4, 8) if distributed == "data" else (4, 4))


@tensorflow_only
def test_under_a_mirrored_strategy_the_ema_matches_the_reference_on_every_replica():
    strategy = tf.distribute.MirroredStrategy([d.name for d in DEVICES[:2]])
    with strategy.scope():
        plain, model = make_model(), make_model()
    rec, ema = Recorder(), EMA(decay=0.9, validate="both", final_weights="raw")
    for _ in range(2):  # the second fit reuses the traced step
        plain.fit(X, Y, epochs=1, **FIT)
        history = model.fit(X, Y, epochs=1, validation_data=VAL, callbacks=[ema, rec], **FIT)
    del rec.steps[9]  # the second fit's start repeats the first's end
    assert int(ema._steps.value.values[1].numpy()) == 16
    assert_close(shadow(ema), reference(rec.steps, 0.9))
    assert_equal(trained_weights(model), trained_weights(plain))  # validation swapped back
    assert history.history["val_ema_loss"] != history.history["val_loss"]
    for s in [*ema._shadow, ema._steps]:  # one copy on each replica, all equal
        copies = s.value.values
        assert [tf.DeviceSpec.from_string(c.device).device_index for c in copies] == [0, 1]
        for c in copies[1:]:
            np.testing.assert_array_equal(c.numpy(), copies[0].numpy(), err_msg=s.name)
