"""Averages match the tutorial's in-memory method and load back in the Keras that wrote them."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, correctly_rounded, files, ulp_distance
from make_checkpoints import KERAS2, KERAS3, build, data

import streamavg
from streamavg.formats import open_checkpoint

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

# Neither Keras 3 (TensorFlow backend) nor tf_keras can load the bfloat16 legacy .h5 files
# they write themselves ("No cast function available"): those cases are checked at the HDF5
# level only, in test_every_format_agrees_with_np_average.
LOADABLE = [case for case in CASES if case not in ("k2-h5-bf16", "k3-h5-bf16")]
TUTORIAL_WEIGHTS = {  # the tutorial's weights, newest first
    "equal": lambda n: [1 / n] * n,
    "linear": lambda n: [i / n for i in range(n, 0, -1)],
    "exp": lambda n: [np.exp(-i / 2.0) for i in range(1, n + 1)],
}


def load(case: str, path: Path):
    """Load a checkpoint into a model the way a user would, with the Keras that wrote it."""
    if case in KERAS3:
        policy, pattern = KERAS3[case]
        module, set_policy = keras, keras.config.set_dtype_policy
        weights_only = pattern.endswith(".weights.h5")
    else:
        policy, _, weights_only = KERAS2[case]
        module, set_policy = tf_keras, tf_keras.mixed_precision.set_global_policy
    set_policy(policy)
    try:
        if weights_only:
            model = build(module, data()[0])
            model.load_weights(str(path))
            return model
        return module.models.load_model(str(path), compile=False)
    finally:
        set_policy("float32")


@cache
def checkpoint_weights(case: str, directory: Path) -> list[list[np.ndarray]]:
    return [load(case, p).get_weights() for p in files(directory / case)]


def tutorial_average(case: str, directory: Path, scheme: str) -> list[np.ndarray]:
    """The tutorial: reverse the models to newest first, np.average each layer, cast back."""
    models = checkpoint_weights(case, directory)[::-1]
    w = TUTORIAL_WEIGHTS[scheme](len(models))
    return [
        np.average(np.array([m[k] for m in models]), axis=0, weights=w).astype(models[0][k].dtype)
        for k in range(len(models[0]))
    ]


@pytest.mark.parametrize("scheme", sorted(TUTORIAL_WEIGHTS))
@pytest.mark.parametrize("case", LOADABLE)
def test_agrees_with_tutorial_within_one_ulp(checkpoints, tmp_path, case, scheme):
    newest = files(checkpoints / case)[-1]
    out = tmp_path / newest.name.replace(newest.name.split(".")[0], "avg")
    streamavg.average([checkpoints / case], scheme=scheme, output=out)
    got = load(case, out).get_weights()
    want = tutorial_average(case, checkpoints, scheme)
    newest_weights = checkpoint_weights(case, checkpoints)[-1]
    assert [g.dtype for g in got] == [w.dtype for w in newest_weights]
    for g, w, last in zip(got, want, newest_weights, strict=True):
        if g.dtype.kind == "i":  # counters are copied from the newest checkpoint
            assert np.array_equal(g, last)
        else:
            assert ulp_distance(g, w) <= 1


@pytest.mark.parametrize("case", LOADABLE)
def test_output_predicts_like_the_reference_weights(checkpoints, tmp_path, case):
    """The reference: np.average in float64 over get_weights(), oldest first, cast back."""
    paths = files(checkpoints / case)
    out = tmp_path / paths[-1].name.replace(paths[-1].name.split(".")[0], "avg")
    streamavg.average([checkpoints / case], scheme="linear", output=out)
    models = checkpoint_weights(case, checkpoints)
    w = streamavg.scheme_weights("linear", len(models))
    reference = load(case, paths[-1])
    reference.set_weights(
        [
            np.average(np.array([m[k] for m in models]), axis=0, weights=w).astype(v.dtype)
            for k, v in enumerate(models[-1])
        ]
    )
    x = data(seed=7)[0]
    assert np.array_equal(load(case, out).predict(x, verbose=0), reference.predict(x, verbose=0))


@pytest.mark.parametrize("case", CASES)
def test_every_format_agrees_with_np_average(checkpoints, tmp_path, case):
    """Every stored model tensor against np.average over the stored values, in float64."""
    paths = files(checkpoints / case)
    out = tmp_path / paths[-1].name.replace(paths[-1].name.split(".")[0], "avg")
    result = streamavg.average([checkpoints / case], scheme="linear", output=out)
    got = streamavg.average_tensors([out])
    inputs = [streamavg.average_tensors([p]) for p in paths]  # one file: its tensors as stored
    assert result.weights == tuple(streamavg.scheme_weights("linear", len(paths)))
    assert list(got) == list(inputs[-1])
    for name, value in got.items():
        stack = np.array([x[name] for x in inputs])
        if value.dtype.kind == "i":
            assert np.array_equal(value, inputs[-1][name])
            continue
        want = correctly_rounded(stack, range(1, len(paths) + 1), value.dtype)  # linear
        assert ulp_distance(value, want) == 0, name
    with open_checkpoint(out) as averaged, open_checkpoint(paths[-1]) as newest:
        assert json.loads(averaged.h5.attrs["streamavg"])["files"] == [p.name for p in paths]
        assert "streamavg" not in newest.h5.attrs


def test_float16_and_bfloat16_are_stored_as_keras_stores_them(checkpoints, tmp_path):
    import h5py

    for case, dtype in [("k3-weights-f16", "float16"), ("k3-h5-bf16", "bfloat16")]:
        out = tmp_path / f"{case}.{'weights.h5' if 'weights' in case else 'h5'}"
        streamavg.average([checkpoints / case], output=out)
        with h5py.File(files(checkpoints / case)[-1]) as src, h5py.File(out) as dst:
            kernel = next(
                n for n in open_checkpoint(out).tensors if n.endswith(("vars/0", "kernel"))
            )
            assert open_checkpoint(out).tensors[kernel].dtype.name == dtype
            assert dst[kernel].id.get_type() == src[kernel].id.get_type()
            assert dict(dst[kernel].attrs) == dict(src[kernel].attrs)


def test_load_into_model_sets_the_averaged_weights(checkpoints, tmp_path):
    src = checkpoints / "k3-keras"
    model = load("k3-keras", files(src)[0])
    result = streamavg.load_into_model(model, [src], scheme="exp", alpha=3.0)
    streamavg.average([src], scheme="exp", alpha=3.0, output=tmp_path / "avg.keras")
    want = keras.models.load_model(str(tmp_path / "avg.keras")).get_weights()
    assert result.output is None
    assert result.files == tuple(files(src))
    for got, expected in zip(model.get_weights(), want, strict=True):
        assert np.array_equal(got, expected)


def test_optimizer_newest_keeps_the_newest_optimizer_state(checkpoints, tmp_path):
    src = checkpoints / "k3-keras"
    out = tmp_path / "avg.keras"
    streamavg.average([src], scheme="linear", output=out, optimizer="newest")
    restored = keras.models.load_model(str(out))
    newest = keras.models.load_model(str(files(src)[-1]))
    assert int(restored.optimizer.iterations) == int(newest.optimizer.iterations) > 0
    for a, b in zip(restored.optimizer.variables, newest.optimizer.variables, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
