"""Unzipped `.keras` models (`model.save(path, zipped=False)`): folders in, a folder out
that `keras.models.load_model` reads, published whole or not at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import killed_while_writing, snapshot, ulp_distance
from training import FIT, X, Y, make_model

import streamavg
from streamavg.cli import main

EPOCHS = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ckpts/epoch_{1..4}/`, each a model saved unzipped after an epoch of training."""
    root = tmp_path_factory.mktemp("unzipped") / "ckpts"
    model = make_model()
    for epoch in range(1, EPOCHS + 1):
        model.fit(X, Y, epochs=1, **FIT)
        model.save(str(root / f"epoch_{epoch}"), zipped=False)
    return root


def loaded(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path).get_weights()


def reference(run_dir: Path, scheme: str) -> list[np.ndarray]:
    """np.average in float64 of the folders' weights, cast back to their dtypes."""
    models = [loaded(run_dir / f"epoch_{e}") for e in range(1, EPOCHS + 1)]
    w = streamavg.scheme_weights(scheme, EPOCHS)
    return [
        np.average(np.stack(ws).astype(np.float64), axis=0, weights=w).astype(ws[0].dtype)
        for ws in zip(*models, strict=True)
    ]


@pytest.mark.parametrize("scheme", ["equal", "linear"])
def test_folders_average_into_a_folder_keras_loads(run_dir, tmp_path, capsys, scheme):
    out = tmp_path / "avg"
    assert main([str(run_dir), "--scheme", scheme, "-o", str(out), "--quiet"]) == 0
    newest = run_dir / f"epoch_{EPOCHS}"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in newest.iterdir())
    assert sorted(p.name for p in out.iterdir()) == [
        "assets",  # empty, as Keras writes it
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    for name in ("config.json", "metadata.json"):
        assert (out / name).read_bytes() == (newest / name).read_bytes()
    got, want = loaded(out), reference(run_dir, scheme)
    assert len(got) == len(want)
    for g, r in zip(got, want, strict=True):
        assert ulp_distance(g, r) <= 1


def test_default_output_is_a_folder_beside_the_checkpoints(run_dir, tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    os.symlink(run_dir, ckpts)  # inputs untouched: the output goes into the link's target
    result = streamavg.average([ckpts], scheme="linear")
    try:
        assert result.output == ckpts / "averaged" / f"epoch_{EPOCHS}.avg-linear-n{EPOCHS}"
        assert result.output.is_dir()
        assert streamavg.plan([ckpts]).files == tuple(
            ckpts / f"epoch_{e}" for e in range(1, EPOCHS + 1)
        )  # the output is not taken for a checkpoint by a later scan
    finally:
        shutil.rmtree(run_dir / "averaged")


def test_an_existing_output_folder_is_replaced_only_with_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main([str(run_dir), "-o", str(out), "--quiet"]) == 0
    before = snapshot(out)
    assert main([str(run_dir), "--scheme", "linear", "-o", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"streamavg: error: {out}: already exists (pass --overwrite to replace it)\n"
    )
    assert snapshot(out) == before
    assert main([str(run_dir), "-o", str(out), "--overwrite", "-q"]) == 0
    assert snapshot(out) == before  # the same inputs, the same bytes
    assert main([str(run_dir), "--scheme", "linear", "-o", str(out), "--overwrite", "-q"]) == 0
    assert snapshot(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]  # the old one is gone
    for g, r in zip(loaded(out), reference(run_dir, "linear"), strict=True):
        assert ulp_distance(g, r) <= 1


def test_output_names_keras_would_not_read_as_a_folder_are_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "avg.keras"
    assert main([str(run_dir), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"streamavg: error: {out}: the inputs are keras-dir folders, which Keras does not "
        "read under a name ending in .keras\n"
    )
    (tmp_path / "file").write_text("")
    assert main([str(run_dir), "-o", str(tmp_path / "file"), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"streamavg: error: {tmp_path / 'file'}: is a file, and the output is a folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 unzipped copies (hard links) of a 24 MB model: a run long enough to be killed."""
    root = tmp_path_factory.mktemp("slow")
    model = keras.Sequential(
        [keras.Input((1000,)), keras.layers.Dense(2000), keras.layers.Dense(2000)]
    )
    model.save(str(root / "model"), zipped=False)
    for i in range(60):
        (root / "ckpts" / f"epoch_{i:02d}").mkdir(parents=True)
        for f in (root / "model").iterdir():
            if f.is_dir():  # assets/
                (root / "ckpts" / f"epoch_{i:02d}" / f.name).mkdir()
            else:
                os.link(f, root / "ckpts" / f"epoch_{i:02d}" / f.name)
    return root / "ckpts"


def test_a_killed_run_leaves_no_folder_and_the_next_run_cleans_up(slow, run_dir, tmp_path):
    """Killed while writing: no output folder (nothing Keras could load), only a hidden
    temporary folder, which the next run in that folder removes."""
    out = tmp_path / "avg"
    _, temp = killed_while_writing(tmp_path, slow, "-o", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [temp]
    assert temp.name.startswith(".avg.streamavg-") and temp.is_dir()
    assert main([str(run_dir), "-o", str(tmp_path / "other"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_failed_write_leaves_no_folder(run_dir, tmp_path):
    """Over the file size limit part way through the weights: one line, and neither the
    output folder nor a temporary one left."""
    out = tmp_path / "new" / "avg"
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000)); "
    run = f"{limit}import sys; from streamavg.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", run, str(run_dir), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stderr) == (
        1,
        f"streamavg: error: {out}: cannot write (File too large)\n",
    )
    assert list(tmp_path.iterdir()) == []
