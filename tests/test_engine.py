"""The fold: blocks that tile every tensor, bounded memory, and more files than open files."""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import files, ulp_distance
from hypothesis import given
from hypothesis import strategies as st

import streamavg
from streamavg.blocks import block_shape, blocks, flat_start
from streamavg.engine import BYTES_PER_ELEMENT, MIN_MEMORY, piece_layout

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@given(
    shape=st.lists(st.integers(0, 6), max_size=4).map(tuple),
    elements=st.integers(1, 40),
)
def test_blocks_tile_a_tensor_in_order_with_contiguous_pieces(shape, elements):
    flat = np.arange(math.prod(shape)).reshape(shape)
    seen = []
    for index in blocks(shape, elements):
        piece = flat[index]
        assert piece.shape == block_shape(shape, index)
        assert piece.size <= elements or piece.size == 1
        if piece.size:  # one run of consecutive elements, starting where flat_start says
            assert piece.ravel()[0] == flat_start(shape, index)
            assert np.array_equal(np.diff(piece.ravel()), np.ones(piece.size - 1))
        seen.extend(piece.ravel().tolist())
    assert seen == list(range(flat.size))


@given(st.integers(MIN_MEMORY, 1 << 34))
def test_piece_layout_fits_the_budget(max_memory):
    workers, elements = piece_layout(max_memory)
    assert workers >= 1 and elements >= 1
    assert workers * elements * BYTES_PER_ELEMENT <= max_memory
    fastest = piece_layout(None)
    assert workers <= fastest[0] and elements <= fastest[1]


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real checkpoints whose kernel rows (40,000 floats) are wider than a 1M budget's pieces."""
    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(40_000), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    saves = [keras.callbacks.ModelCheckpoint(str(root / s / f"m_{{epoch}}.{s}")) for s in FORMATS]
    for s in FORMATS:
        (root / s).mkdir()
    model.fit(x, y, epochs=3, verbose=0, callbacks=saves)
    return root


FORMATS = ("keras", "h5")


@pytest.mark.parametrize("suffix", FORMATS)
def test_bounded_memory_gives_the_default_result(wide, tmp_path, suffix):
    _, elements = piece_layout(MIN_MEMORY)
    assert elements < 40_000  # the kernel is split within its rows
    default, bounded = tmp_path / f"default.{suffix}", tmp_path / f"bounded.{suffix}"
    streamavg.average([wide / suffix], scheme="linear", output=default)
    streamavg.average([wide / suffix], scheme="linear", output=bounded, max_memory=MIN_MEMORY)
    if suffix == "keras":  # the weights member's CRC, combined from many pieces, checks out
        with zipfile.ZipFile(bounded) as archive:
            assert archive.testzip() is None
    got, want = streamavg.average_tensors([bounded]), streamavg.average_tensors([default])
    inputs = [streamavg.average_tensors([p]) for p in files(wide / suffix)]
    weights = streamavg.scheme_weights("linear", len(inputs))
    assert list(got) == list(want) and any(v.shape == (4, 40_000) for v in got.values())
    for name, value in got.items():
        reference = np.average(
            np.array([x[name] for x in inputs], np.float64), axis=0, weights=weights
        )
        assert np.array_equal(value, want[name]), name
        assert ulp_distance(value, reference.astype(value.dtype)) <= 1, name


def _limit_open_files(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return preexec


def test_more_checkpoints_than_open_files(checkpoints, tmp_path):
    """50 checkpoints under a hard limit of 40 open files: each is reopened for every read."""
    sources = files(checkpoints / "k3-keras")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(50):
        shutil.copy(sources[i % len(sources)], many / f"model_{i:02d}.keras")
    out = tmp_path / "avg.keras"
    cmd = [sys.executable, "-m", "streamavg", str(many), "-o", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_open_files(40))
    assert proc.returncode == 0, proc.stderr
    inputs = [streamavg.average_tensors([p]) for p in files(many)]
    for name, value in streamavg.average_tensors([out]).items():
        if value.dtype.kind == "f":
            reference = np.mean(np.array([x[name] for x in inputs], np.float64), axis=0)
            assert ulp_distance(value, reference.astype(value.dtype)) <= 1, name


def test_scalar_weights_are_averaged_and_compared(tmp_path):
    """A layer's 0-d weights: a float one is averaged within 1 ulp, an int one that is the
    same everywhere is copied, and one that differs is refused, naming it."""
    keras = pytest.importorskip("keras")

    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.gain = self.add_weight(shape=(), initializer="ones", name="gain")
            self.tag = self.add_weight(shape=(), dtype="int32", trainable=False, name="tag")

        def call(self, x):
            return x * self.gain

    model = keras.Sequential([keras.Input((3,)), Scale()])
    gains = [0.1, 1 / 3, 2.7, -5.0]
    for i, gain in enumerate(gains):
        model.layers[0].gain.assign(gain)
        model.layers[0].tag.assign(7)
        model.save_weights(tmp_path / f"m_{i}.weights.h5")
    got = streamavg.average_tensors([tmp_path], scheme="linear")
    weights = streamavg.scheme_weights("linear", len(gains))
    reference = np.average(np.array(gains, np.float32).astype(np.float64), weights=weights)
    assert got["layers/scale/vars/0"].shape == ()
    assert ulp_distance(got["layers/scale/vars/0"], reference.astype(np.float32)) <= 1
    assert got["layers/scale/vars/1"] == 7
    model.layers[0].tag.assign(8)
    model.save_weights(tmp_path / "m_4.weights.h5")
    with pytest.raises(streamavg.StreamavgError) as e:
        streamavg.average_tensors([tmp_path])
    assert str(e.value) == (
        f"{tmp_path / 'm_0.weights.h5'}: layers/scale/vars/1: int32 values differ from "
        f"{tmp_path / 'm_4.weights.h5'} (integer weights, such as quantized kernels, cannot be "
        "averaged; pass integers='newest' to take such layers from the newest checkpoint)"
    )
