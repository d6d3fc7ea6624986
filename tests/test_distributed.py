"""The EMA under `keras.distribution` on JAX: data- and model-parallel on two host devices.

Runs where this process's backend is JAX with two devices or more, as `test_backends.py`
starts it (`XLA_FLAGS=--xla_force_host_platform_device_count=2`); skipped elsewhere.
"""

from __future__ import annotations

import keras
import pytest
from training import FIT, Recorder, X, Y, assert_close, assert_equal, make_model, reference, shadow

from streamavg.callbacks import EMA

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution runs on the jax backend", allow_module_level=True)

import jax

if len(jax.devices()) < 2:
    pytest.skip("needs two devices (XLA_FLAGS, as test_backends.py sets)", allow_module_level=True)


def model_parallel() -> keras.distribution.ModelParallel:
    """The hidden layer's kernel split across both devices by its columns; the rest replicated."""
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], jax.devices()[:2])
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["mlp/hidden/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")


@pytest.fixture(params=["data", "model"])
def distributed(request):
    if request.param == "data":
        distribution = keras.distribution.DataParallel(devices=jax.devices()[:2])
    else:
        distribution = model_parallel()
    keras.distribution.set_distribution(distribution)
    yield request.param
    keras.distribution.set_distribution(None)


def test_the_ema_matches_the_reference_leaves_training_untouched_and_is_laid_out_as_the_weights(
    distributed,
):
    plain = make_model()
    plain.fit(X, Y, epochs=2, **FIT)
    model, rec, ema = make_model(), Recorder(), EMA(decay=0.9, final_weights="raw")
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    assert_close(shadow(ema), reference(rec.steps, 0.9))
    assert_equal(
        {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables},
        {v.path: keras.ops.convert_to_numpy(v) for v in plain.trainable_variables},
    )
    for s, v in zip(ema._shadow, ema._tracked, strict=True):  # laid out as its weight
        assert s.value.sharding.is_equivalent_to(v.value.sharding, len(v.shape)), v.path
    kernel = ema._shadow[0].value.sharding
    assert kernel.is_fully_replicated == (distributed == "data")
    assert kernel.shard_shape((4, 8)) == ((4, 8) if distributed == "data" else (4, 4))
