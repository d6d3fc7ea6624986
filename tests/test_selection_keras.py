"""Selection on folders written by real Keras training: ModelCheckpoint names with metrics,
save_best_only files, checkpoint directories, batch checkpoints and CSVLogger files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import snapshot
from training import FIT, VAL, X, Y, make_model

import streamavg
from streamavg.cli import main
from streamavg.output import destination
from streamavg.select import select_checkpoints

EPOCHS = 10  # the last has two digits
QUICK = {**FIT, "batch_size": 32}  # 2 steps an epoch


NOTE = "left out {}: no epoch number in the name, unlike the other checkpoints"


def checkpoint(path: Path, **kwargs) -> keras.callbacks.ModelCheckpoint:
    weights_only = path.name.endswith(".weights.h5")
    return keras.callbacks.ModelCheckpoint(str(path), save_weights_only=weights_only, **kwargs)


@pytest.fixture(scope="session")
def fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run saved every way the tests need and logged by CSVLogger, then one
    stopped and resumed in `resumed/` (read-only)."""
    root = tmp_path_factory.mktemp("fit")
    model = make_model()

    def unzipped(epoch, logs):  # model.save(..., zipped=False) writes a folder
        model.save(str(root / "unzipped" / f"ckpt-{epoch + 1}"), zipped=False)

    callbacks = [
        checkpoint(root / "first" / "model-{val_loss:.2f}-{epoch:02d}.keras"),
        checkpoint(root / "first" / "best.keras", save_best_only=True),
        checkpoint(root / "ep" / "model_{val_loss:.4f}_ep{epoch}.weights.h5"),
        checkpoint(root / "dirs" / "epoch_{epoch}" / "model.weights.h5"),
        checkpoint(root / "batches" / "model_{epoch}_{batch}.weights.h5", save_freq=1),
        keras.callbacks.LambdaCallback(on_epoch_end=unzipped),
        keras.callbacks.CSVLogger(str(root / "log.csv")),
    ]
    model.fit(X, Y, validation_data=VAL, epochs=EPOCHS, callbacks=callbacks, **QUICK)
    resumed = root / "resumed"  # the same model goes on, stopped and resumed
    resumed.mkdir()
    callbacks = [
        checkpoint(resumed / "model_{epoch:02d}.weights.h5"),
        checkpoint(resumed / "named" / "model-{val_loss:.4f}-{epoch:02d}.weights.h5"),
        keras.callbacks.CSVLogger(str(resumed / "log.csv"), append=True),
    ]
    model.fit(X, Y, validation_data=VAL, epochs=4, callbacks=callbacks, **QUICK)
    model.fit(X, Y, validation_data=VAL, epochs=5, initial_epoch=2, callbacks=callbacks, **QUICK)
    return root


def logged(path: Path, column: str = "val_loss") -> list[tuple[int, float]]:
    """(CSV epoch, value) of every row, read plainly."""
    with open(path, newline="") as f:
        return [(int(row["epoch"]), float(row[column])) for row in csv.DictReader(f)]


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_metric_before_the_epoch_and_save_best_only(fit):
    """`model-{val_loss:.2f}-{epoch:02d}.keras` in epoch order; `best.keras` left out."""
    first = fit / "first"
    want = [first / f"model-{v:.2f}-{e + 1:02d}.keras" for e, v in logged(fit / "log.csv")]
    sel = select_checkpoints([first])
    assert sel.paths == tuple(want)
    assert sel.notes == (NOTE.format(first / "best.keras"),)
    assert select_checkpoints([first], last=3).paths == tuple(want[-3:])
    assert select_checkpoints([first], epochs="2:3").paths == tuple(want[1:3])


def test_log_values_belong_to_each_checkpoints_epoch(fit):
    """CSVLogger's row `epoch` e is ModelCheckpoint's `{epoch}` e + 1: the value the log
    gives each file is the one Keras wrote into its name."""
    sel = select_checkpoints([fit / "ep"], best=4, monitor="val_loss", log=fit / "log.csv")
    assert len(sel.paths) == 4
    for path, value in zip(sel.paths, sel.values, strict=True):
        assert path.name.startswith(f"model_{value:.4f}_ep")
    rows = dict(logged(fit / "log.csv"))
    epochs = [int(p.name.removesuffix(".weights.h5").rpartition("ep")[2]) for p in sel.paths]
    assert sel.values == tuple(rows[e - 1] for e in epochs)
    assert sorted(sel.values) == sorted(rows.values())[:4]


def test_best_one_is_what_save_best_only_kept(fit):
    (best,) = select_checkpoints(
        [fit / "first"], best=1, monitor="val_loss", log=fit / "log.csv"
    ).paths
    got = streamavg.average_tensors([best])
    want = streamavg.average_tensors([fit / "first" / "best.keras"])
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_template_values_are_the_rounded_log(fit):
    template = "model-{val_loss:.2f}-{epoch:02d}.keras"
    sel = select_checkpoints([fit / "first"], template=template, best=3, monitor="val_loss")
    rows = dict(logged(fit / "log.csv"))
    epochs = [int(p.name[-8:-6]) for p in sel.paths]
    assert sel.values == tuple(round(rows[e - 1], 2) for e in epochs)
    assert sel.notes == (
        f"left out {fit / 'first' / 'best.keras'}: not named like template={template!r}",
    )


def test_dry_run_prints_and_touches_nothing(fit, capsys):
    first = fit / "first"
    before = snapshot(fit)
    code, out, err = run(capsys, first, "--last", "3", "--scheme", "linear", "--dry-run")
    assert code == 0
    files = select_checkpoints([first], last=3).paths
    dest = destination(None, "keras", files, "linear")
    weights = streamavg.scheme_weights("linear", 3)
    assert out.splitlines() == [
        f"{'#':>3}  {'weight':>8}  file",
        *(f"{i:>3}  {w:8.6f}  {f}" for i, (f, w) in enumerate(zip(files, weights, strict=True), 1)),
        f"dry run: would average 3 files (linear) into {dest}",
    ]
    assert err == f"streamavg: note: {NOTE.format(first / 'best.keras')}\n"
    assert snapshot(fit) == before and not (first / "averaged").exists()


def test_earlier_output_in_the_folder(fit, tmp_path, capsys):
    """An average moved in beside its checkpoints, named like a later one: left out with a
    note, whether the folder is scanned or a glob names it."""
    folder = Path(shutil.copytree(fit / "ep", tmp_path / "ep"))
    originals = sorted(folder.iterdir())
    output = folder / "model_0.0000_ep99.weights.h5"
    streamavg.average([folder], output=output)
    sel = select_checkpoints([folder])
    assert set(sel.paths) == set(originals) and len(sel.paths) == EPOCHS
    assert sel.notes == (f"left out {output}: an earlier streamavg output",)
    code, out, err = run(capsys, *sorted(folder.iterdir()), "--dry-run")  # ckpts/*
    assert (code, err) == (0, f"streamavg: note: left out {output}: an earlier streamavg output\n")
    assert [line.split()[-1] for line in out.splitlines()[1:-1]] == list(map(str, sel.paths))


@pytest.mark.parametrize("case", ["dirs", "unzipped"])
def test_directories_named_by_epoch(fit, case):
    """`epoch_{epoch}/model.weights.h5` from ModelCheckpoint, `ckpt-{epoch}/` from
    model.save(zipped=False): ordered by the directories' epochs, however given. An
    unzipped model is its folder, unless its weights file is named alone."""
    prefix = {"dirs": "epoch_", "unzipped": "ckpt-"}[case]
    folders = tuple(fit / case / f"{prefix}{e}" for e in range(1, EPOCHS + 1))
    weights = tuple(f / "model.weights.h5" for f in folders)
    found = weights if case == "dirs" else folders
    as_files = sorted((fit / case).glob("*/model.weights.h5"))
    as_dirs = sorted((fit / case).iterdir())
    for inputs, want in [(as_files, weights), (as_dirs, found), ([fit / case], found)]:
        sel = select_checkpoints(inputs)
        assert (sel.paths, sel.by_mtime, sel.notes) == (want, False, ())
    assert select_checkpoints([fit / case], epochs="9:").paths == found[-2:]


def test_batch_checkpoints(fit):
    """`save_freq=1` of 2 steps: two checkpoints an epoch, which a per-epoch log cannot rank."""
    folder, log = fit / "batches", fit / "log.csv"
    want = tuple(folder / f"model_{e}_{b}.weights.h5" for e in range(1, EPOCHS + 1) for b in (1, 2))
    assert select_checkpoints([folder]).paths == want
    template = "model_{epoch}_{batch}.weights.h5"
    assert select_checkpoints([folder], template=template).paths == want
    with pytest.raises(streamavg.StreamavgError) as e:
        select_checkpoints([folder], best=2, monitor="val_loss", log=log)
    assert (
        str(e.value) == f"{log} has one row per epoch, but {want[0]} and {want[1]} are both epoch 1"
    )


@pytest.fixture(scope="session")
def resumed(fit: Path) -> Path:
    """A run stopped after 4 epochs and resumed from epoch 3, with CSVLogger(append=True)."""
    return fit / "resumed"


def test_appended_log_after_a_resumed_run(resumed):
    """Epochs 3 and 4 are logged twice; their last rows describe the files saved over."""
    rows = logged(resumed / "log.csv")
    assert [e for e, _ in rows] == [0, 1, 2, 3, 2, 3, 4]
    sel = select_checkpoints([resumed], best=5, monitor="val_loss", log=resumed / "log.csv")
    assert sel.paths == tuple(resumed / f"model_{e:02d}.weights.h5" for e in range(1, 6))
    assert sel.values == tuple(v for _, v in rows[:2] + rows[4:])
    assert sel.values[2:4] != tuple(v for _, v in rows[2:4])


def test_resumed_run_with_metrics_in_names_claims_epochs_twice(resumed):
    a, b = sorted((resumed / "named").glob("*-03.weights.h5"), key=str)
    with pytest.raises(streamavg.StreamavgError) as e:
        select_checkpoints([resumed / "named"])
    assert str(e.value) == f"{a} and {b} are both epoch 3; keep one of them"
