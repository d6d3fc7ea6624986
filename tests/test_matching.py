"""Which tensors are averaged with which: legacy layers by position, integers never averaged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import HERE, files, ulp_distance
from make_checkpoints import QUANTIZED, RENAMED, renamed_model

import streamavg
from streamavg.cli import main
from streamavg.engine import MIN_MEMORY
from streamavg.errors import StreamavgError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

QUANTIZED_LAYERS = ("layers/dense/", "layers/dense_1/")  # both Dense layers; not the BatchNorm
INTEGERS_DIFFER = (
    "{old}: layers/dense/vars/0: int8 values differ from {new} (integer weights, such as "
    "quantized kernels, cannot be averaged; pass {flag} to take such layers from the newest "
    "checkpoint)"
)


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RENAMED and QUANTIZED cases of make_checkpoints.py, one directory each."""
    root = tmp_path_factory.mktemp("matching")
    for which in ("renamed", "quantized"):
        cmd = [sys.executable, str(HERE / "make_checkpoints.py"), str(root), which]
        subprocess.run(cmd, check=True, capture_output=True)
    return root


def stored_weights(case: str, path: Path) -> list[np.ndarray]:
    """A checkpoint's weights as the Keras that wrote it loads them: by position."""
    module, weights_only = RENAMED[case]
    keras_module = keras if module == "keras" else tf_keras
    if weights_only:
        model = renamed_model(keras_module, "shifted")  # any names: loaded by position
        model.load_weights(str(path))
        return model.get_weights()
    return keras_module.models.load_model(str(path), compile=False).get_weights()


def layer_names(path: Path) -> list[str]:
    with h5py.File(path) as f:
        return [
            n.decode() if isinstance(n, bytes) else n
            for n in f.get("model_weights", f).attrs["layer_names"]
        ]


# -- 1. legacy .h5: layers matched by position, as Keras loads them --------------------------


@pytest.mark.parametrize("epochs", [(1, 2, 4, 5), (1, 2, 3, 4, 5)], ids=["crossed", "all"])
@pytest.mark.parametrize("case", sorted(RENAMED))
def test_legacy_layers_are_averaged_by_position(extra, tmp_path, case, epochs):
    """Epochs 1-2 and 4-5 call the same layer dense and dense_1 (crossed), epoch 3 neither:
    the average is np.average over get_weights(), which Keras orders by position."""
    paths = [files(extra / case)[e - 1] for e in epochs]
    assert layer_names(paths[0]) == ["dense", "dense_1", "dense_2"]
    assert layer_names(paths[-1]) == ["dense_1", "dense", "dense_2"]
    out = tmp_path / "avg.h5"
    result = streamavg.average(paths, scheme="linear", output=out)
    inputs = [stored_weights(case, p) for p in paths]
    got = stored_weights(case, out)
    assert len(got) == len(inputs[-1]) == 6
    for k, value in enumerate(got):
        stack = np.array([x[k] for x in inputs], np.float64)
        want = np.average(stack, axis=0, weights=result.weights).astype(value.dtype)
        assert ulp_distance(value, want) <= 1, k
    assert layer_names(out) == layer_names(paths[-1])  # written like the newest


def test_legacy_weights_that_do_not_pair_up_are_refused(extra, checkpoints, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for p in files(extra / "k2-h5-renamed")[2:]:  # epoch 3 names its first layer dense_3
        (d / p.name).write_bytes(p.read_bytes())
    third, newest = d / "model_3.h5", d / "model_5.h5"
    with h5py.File(third, "r+") as f:  # kernel and bias swapped in the list Keras loads by
        layer = f["model_weights/dense_3"]
        layer.attrs["weight_names"] = layer.attrs["weight_names"][::-1]
    assert main([str(d), "-o", str(tmp_path / "avg.h5"), "--quiet"]) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {third}: model_weights/dense_3/dense_3/bias:0: a bias, where "
        f"{newest} has a kernel (model_weights/dense_1/dense_1/kernel:0) in its place\n"
    )
    other = d / "model_1.h5"  # Normalization, Dense, BatchNorm, Dense
    other.write_bytes(files(checkpoints / "k2-h5")[0].read_bytes())
    assert main([str(other), str(newest), "-o", str(tmp_path / "avg.h5"), "--quiet"]) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {other}: 4 layers with weights here, 3 in {newest}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# -- 2. integer tensors that differ: refused, or their layers taken whole from the newest ---


@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_differing_integers_are_refused(extra, tmp_path, capsys, case):
    paths = files(extra / case)
    out = tmp_path / "avg.keras"
    assert main([str(extra / case), "-o", str(out), "--quiet"]) == 1
    message = INTEGERS_DIFFER.format(old=paths[0], new=paths[-1], flag="--integers newest")
    assert capsys.readouterr().err == f"streamavg: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_memory", [None, MIN_MEMORY], ids=["default", "bounded"])
@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_integers_newest_takes_quantized_layers_whole(extra, tmp_path, capsys, case, max_memory):
    paths = files(extra / case)
    out = tmp_path / "avg.keras"
    extra_args = ["--max-memory", str(max_memory)] if max_memory else []
    args = [str(extra / case), "-o", str(out), "--quiet", "--scheme", "linear", *extra_args]
    assert main([*args, "--integers", "newest"]) == 0
    quantized = sorted({n.rsplit("/", 1)[0] for n in streamavg.average_tensors([paths[-1]])
                        if n.startswith(QUANTIZED_LAYERS)})  # fmt: skip
    assert capsys.readouterr().err == (  # says which layers are not averaged
        f"streamavg: note: {', '.join(quantized)}: integers differ, so taken whole from "
        f"{paths[-1]}\n"
    )
    got = streamavg.average_tensors([out])
    inputs = [streamavg.average_tensors([p]) for p in paths]
    weights = streamavg.scheme_weights("linear", len(paths))
    assert list(got) == list(inputs[-1])
    assert {v.dtype.name for n, v in got.items() if n.startswith(QUANTIZED_LAYERS)} >= {"int8"}
    for name, value in got.items():
        stack = np.array([x[name] for x in inputs])
        if name.startswith(QUANTIZED_LAYERS):  # kernel, scale and bias alike: the newest's
            assert value.dtype == stack[-1].dtype and value.tobytes() == stack[-1].tobytes()
            continue
        assert not (stack == stack[-1]).all(), name  # the BatchNorm weights changed
        want = np.average(stack.astype(np.float64), axis=0, weights=weights)
        assert ulp_distance(value, want.astype(value.dtype)) <= 1, name
    loaded, newest = keras.saving.load_model(out), keras.saving.load_model(paths[-1])
    for layer, theirs in zip(loaded.layers, newest.layers, strict=True):
        for k, (v, w) in enumerate(zip(layer.weights, theirs.weights, strict=True)):
            if layer.name.startswith("dense"):
                assert np.array_equal(np.asarray(v), np.asarray(w)), v.path
            else:
                assert np.array_equal(np.asarray(v), got[f"layers/{layer.name}/vars/{k}"])


def _average_tensors(directory: Path, **options) -> list[dict[str, np.ndarray]]:
    return [streamavg.average_tensors([directory], **options)]


def _sweep(directory: Path, **options) -> list[dict[str, np.ndarray]]:
    seen = []
    streamavg.sweep([directory], evaluate=lambda t: seen.append(t) or 0.0, **options)
    return seen


def _greedy_soup(directory: Path, **options) -> list[dict[str, np.ndarray]]:
    seen = []
    streamavg.greedy_soup([directory], evaluate=lambda t: seen.append(t) or 0.0, **options)
    return seen


@pytest.mark.parametrize("how", [_average_tensors, _sweep, _greedy_soup], ids=lambda f: f.__name__)
def test_every_path_to_averaged_tensors_checks_integers(extra, how):
    directory = extra / "k3-int8"
    paths = files(directory)
    with pytest.raises(StreamavgError) as refused:
        how(directory)
    flag = "integers='newest'"
    assert str(refused.value) == INTEGERS_DIFFER.format(old=paths[0], new=paths[-1], flag=flag)
    newest = streamavg.average_tensors([paths[-1]])
    seen = how(directory, integers="newest")
    assert len(seen) == {"_average_tensors": 1, "_sweep": 5, "_greedy_soup": 9}[how.__name__]
    for tensors in seen:
        assert list(tensors) == list(newest)
        for name in (n for n in newest if n.startswith(QUANTIZED_LAYERS)):
            assert tensors[name].tobytes() == newest[name].tobytes(), name


def test_load_into_model_passes_integers_on(extra, tmp_path):
    directory = extra / "k3-int8"
    model = keras.saving.load_model(files(directory)[0])
    streamavg.load_into_model(model, [directory], integers="newest")
    streamavg.average([directory], integers="newest", output=tmp_path / "avg.keras")
    want = keras.saving.load_model(tmp_path / "avg.keras")
    for got, expected in zip(model.weights, want.weights, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(expected)), got.path
