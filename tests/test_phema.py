"""Post-hoc EMA end to end: `PostHocEMA` snapshots from a real Keras run, then `phema`."""
# Snapshots hold no optimizer state, which Keras says when it loads one into a compiled model.
# ruff: noqa: E501

from __future__ import annotations

import json

import h5py
import keras
import numpy as np
import pytest
from training import FIT, VAL, Recorder, X, Y, assert_close, make_model, weights

import streamavg
from streamavg.callbacks import PostHocEMA
from streamavg.cli import main
from streamavg.posthoc import decay, gamma
from streamavg.synthesis import snapshots

pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
EPOCHS, EVERY = 40, 25  # 8 steps an epoch: 320 steps, a snapshot every 25


def power_reference(steps: list[dict], sigma_rel: float, t: int) -> dict:
    """The float64 power-function EMA after step t of the recorded weights."""
    g, average = gamma(sigma_rel), steps[0]
    for step in range(1, t + 1):
        b = decay(step, g)
        average = {k: b * average[k] + (1 - b) * steps[step][k] for k in average}
    return average


def read(path) -> dict[str, np.ndarray]:
    """A weights file's model datasets by path, as float64."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda n, o: (
                out.__setitem__(n, o[()].astype(np.float64))
                if isinstance(o, h5py.Dataset)
                else None
            )
        )
    return out


def loaded(path) -> dict[str, np.ndarray]:
    """The trainable weights of a new model after `load_weights(path)`, as float64."""
    model = make_model()
    model.load_weights(path)
    return weights(model)


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One training run with PostHocEMA (0.05, 0.10), and a direct EMA of 0.075 beside it."""
    root = tmp_path_factory.mktemp("phema")
    model, rec = make_model(), Recorder()
    stored = PostHocEMA(root / "stored", (0.05, 0.10), every_steps=EVERY)
    direct = PostHocEMA(root / "direct", (0.075,), every_steps=EVERY, save_model=False)
    model.fit(X, Y, epochs=EPOCHS, callbacks=[stored, direct, rec], **FIT)
    return root, rec


def test_snapshots_are_the_power_function_emas_and_load_in_keras(run):
    root, rec = run
    names = sorted(p.name for p in (root / "stored").iterdir())
    steps = range(EVERY, 8 * EPOCHS + 1, EVERY)
    assert names == sorted(
        ["model.keras", "phema-0.05.state.h5", "phema-0.1.state.h5"]
        + [f"phema-{s:g}-{t:09d}.weights.h5" for s in (0.05, 0.1) for t in steps]
    )
    found = snapshots(root / "stored")
    assert [(s.step, s.sigma_rel) for s in found] == [(t, s) for t in steps for s in (0.05, 0.1)]
    for snap in found:
        with h5py.File(snap.path, "r") as f:
            assert "optimizer" not in f
            meta = json.loads(f.attrs["streamavg_phema"])
        assert meta == {
            "sigma_rel": snap.sigma_rel,
            "gamma": gamma(snap.sigma_rel),
            "step": snap.step,
        }
        assert_close(loaded(snap.path), power_reference(rec.steps, snap.sigma_rel, snap.step))
        with h5py.File(snap.path, "r") as f:
            assert {f[k].dtype for k in ("layers/dense/vars/0", "layers/dense_1/vars/0")} == {
                np.dtype("float32")
            }


def test_phema_reconstructs_an_unstored_width_far_better_than_either_stored_one(run, tmp_path):
    root = run[0]
    out = tmp_path / "ema.weights.h5"
    result = streamavg.phema(root / "stored", 0.075, output=out)
    assert result.output == out
    assert len(result.weights) == 24 and abs(sum(result.weights) - 1) < 1e-12
    assert min(result.weights) < 0  # EDM2's combinations are not convex
    t = 300  # the last snapshot's step
    truth = read(root / "direct" / f"phema-0.075-{t:09d}.weights.h5")
    made = read(out)
    assert made.keys() == truth.keys()
    stored = [read(root / "stored" / f"phema-{s:g}-{t:09d}.weights.h5") for s in (0.05, 0.1)]
    nearest = min(distance(s, truth) for s in stored)
    assert distance(made, truth) < 0.1 * nearest
    loaded = make_model()
    loaded.load_weights(out)  # Keras reads the result


def test_the_command_line_prints_the_weights_and_writes_the_same_bytes(run, tmp_path, capsys):
    root = run[0] / "stored"
    api = streamavg.phema(root, 0.07, step=200, output=tmp_path / "api.weights.h5")
    assert main(["phema", str(root), "--sigma-rel", "0.07", "0.08", "--step", "200",
                 "-o", f"{tmp_path}/", "-q"]) == 0  # fmt: skip
    assert_same(read(tmp_path / "ema-0.07-000000200.weights.h5"), read(api.output))
    assert (tmp_path / "ema-0.08-000000200.weights.h5").exists()
    assert main(["phema", str(root), "--sigma-rel", "0.07", "--step", "200", "-o", str(tmp_path / "t.weights.h5"), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["phema", str(root), "--sigma-rel", "0.2", "--step", "60", "-o", str(tmp_path / "x.weights.h5")]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert (
        err
        == "streamavg: note: sigma_rel 0.2 is outside the stored 0.05..0.1: an extrapolation, less accurate\n"
    )
    lines = out.splitlines()
    assert lines[0] == "sigma_rel 0.2 at step 60:"
    assert lines[1].split() == ["#", "weight", "sigma_rel", "step", "file"]
    assert [line.split()[2:4] for line in lines[2:6]] == [
        ["0.05", "25"],
        ["0.1", "25"],
        ["0.05", "50"],
        ["0.1", "50"],
    ]
    assert len(lines) == 7 and lines[-1] == f"wrote {tmp_path / 'x.weights.h5'}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sigma-rel", "0.3"], "sigma_rel must be between 0 and 0.2887; got 0.3"),
        (["--sigma-rel", "0.07", "--step", "10"], "{root}: no snapshots at or before step 10 (the first is at 25)"),
        (["--sigma-rel", "0.07", "--step", "301"], "{root}: step 301 is after the last snapshot's (300)"),
        (["--sigma-rel", "0.07", "--step", "0"], "--step must be a positive step; got 0"),
        (["--sigma-rel", "0.07", "0.08", "-o", "{tmp}/one.weights.h5"], "several --sigma-rel write one file each: give -o a directory"),
        (["--sweep", "0.05:0.1:3"], "--sweep needs --data NPZ, the held-out arrays to score on"),
        (["--sigma-rel", "0.07", "--data", "x.npz", "--metric", "loss"], "--data, --metric: only with --sweep"),
        (["--sweep", "0.05:0.1:3", "--data", "x.npz", "-o", "{root}/phema-0.05-000000025.weights.h5"],
         "{root}/phema-0.05-000000025.weights.h5: output is one of the inputs"),  # before scoring
        (["--sweep", "0.1:0.05:3", "--data", "x.npz"], "--sweep needs FIRST < LAST and COUNT >= 2; got 0.1:0.05:3"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_in_one_line(run, tmp_path, capsys, args, message):
    root = run[0] / "stored"
    args = [a.format(tmp=tmp_path, root=root) for a in args]
    assert main(["phema", str(root), *args]) == 2
    assert capsys.readouterr().err == f"streamavg: error: {message.format(root=root)}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_snapshots_or_with_an_unreadable_weights_file_is_refused(
    run, tmp_path, capsys
):
    make_model().save_weights(tmp_path / "best.weights.h5")  # Keras weights, no snapshot
    assert main(["phema", str(tmp_path), "--sigma-rel", "0.07"]) == 1
    err = capsys.readouterr().err
    assert err == f"streamavg: error: {tmp_path}: no PostHocEMA snapshots (*.weights.h5)\n"
    junk = tmp_path / "other.weights.h5"  # HDF5, but not Keras weights: maybe a damaged snapshot
    junk.write_bytes((run[0] / "stored" / "phema-0.05.state.h5").read_bytes())
    assert main(["phema", str(tmp_path), "--sigma-rel", "0.07"]) == 1
    assert (
        capsys.readouterr().err == f"streamavg: error: {junk}: HDF5 file holds no Keras weights\n"
    )


def test_earlier_outputs_and_other_weights_in_the_folder_are_not_taken_for_snapshots(run, tmp_path):
    root = tmp_path / "stored"
    root.mkdir()
    for p in (run[0] / "stored").glob("phema-*-0000000[25]*.weights.h5"):
        (root / p.name).write_bytes(p.read_bytes())
    before = snapshots(root)
    assert [s.step for s in before] == [25, 25, 50, 50]
    make_model().save_weights(root / "best.weights.h5")  # as ModelCheckpoint writes it
    streamavg.phema(root, 0.07, output=root / "ema.weights.h5")  # copies the attribute
    assert snapshots(root) == before


def test_sweep_scores_each_width_and_writes_the_best(run, tmp_path, capsys):
    root = run[0] / "stored"
    np.savez(tmp_path / "val.npz", x=VAL[0], y=VAL[1])
    out = tmp_path / "best.weights.h5"
    assert main(["phema", str(root), "--sweep", "0.05:0.1:3", "--data", str(tmp_path / "val.npz"), "-o", str(out), "-q"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["sigma_rel", "loss"]
    printed = {float(a): float(b) for a, b in (line.split() for line in lines[1:4])}
    assert list(printed) == [0.05, 0.075, 0.1]
    scores = {}
    for s in printed:  # each is Keras's loss of that EMA
        model = make_model()
        model.load_weights(streamavg.phema(root, s, output=tmp_path / f"{s}.weights.h5").output)
        scores[s] = model.evaluate(*VAL, verbose=0)
        assert abs(scores[s] - printed[s]) <= 5e-5
    best = min(scores, key=scores.get)
    assert lines[4] == f"best: sigma_rel {best:.4f} (loss {scores[best]:.4f})"
    assert_same(read(out), read(tmp_path / f"{best}.weights.h5"))


@pytest.mark.parametrize(
    "compile_args, steps",
    [
        ({"gradient_accumulation_steps": 3}, [5, 10, 15]),  # 16 updates in 48 batches
        pytest.param(
            {"steps_per_execution": 4},
            [8, 12, 16, 20, 28, 32, 36, 40, 48],  # a few steps late
            marks=pytest.mark.skipif(
                keras.backend.backend() == "torch", reason="torch runs one step a call"
            ),
        ),
    ],
    ids=["accumulating", "steps-per-execution"],
)
def test_snapshots_come_every_n_real_steps_and_record_their_exact_step(
    tmp_path, compile_args, steps
):
    model = make_model(**{k: v for k, v in compile_args.items() if k != "steps_per_execution"})
    if "steps_per_execution" in compile_args:
        model.compile(optimizer=model.optimizer, loss="mse", steps_per_execution=4)
    rec = Recorder()
    model.fit(X, Y, epochs=6, callbacks=[PostHocEMA(tmp_path, every_steps=5), rec], **FIT)
    assert sorted({s.step for s in snapshots(tmp_path)}) == steps
    if "gradient_accumulation_steps" in compile_args:  # each holds the EMA of its step
        pairs = zip(rec.steps[1:], rec.iterations[:-1], rec.iterations[1:], strict=True)
        updates = [rec.steps[0], *(w for w, before, after in pairs if after > before)]
        for snap in snapshots(tmp_path):
            assert_close(loaded(snap.path), power_reference(updates, snap.sigma_rel, snap.step))


def test_an_interrupted_run_resumes_to_the_same_snapshots(tmp_path):
    def fit(model, directory, *extra):
        backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
        phema = PostHocEMA(directory, (0.05, 0.1), every_steps=12)
        model.fit(X, Y, epochs=6, callbacks=[backup, phema, *extra], **FIT)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise RuntimeError("crash")

    fit(make_model(), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="crash"):
        fit(make_model(), tmp_path / "resumed", Crash())
    fit(make_model(), tmp_path / "resumed")
    whole = sorted((tmp_path / "whole").glob("*.weights.h5"))
    resumed = sorted((tmp_path / "resumed").glob("*.weights.h5"))
    assert [p.name for p in whole] == [p.name for p in resumed] and len(whole) == 8
    for a, b in zip(whole, resumed, strict=True):
        assert_same(read(b), read(a))
