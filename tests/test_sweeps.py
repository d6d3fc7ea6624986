"""The one-pass sweep over the last n checkpoints, and greedy soups."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import files, floating, ulp_distance
from hypothesis import given, settings
from hypothesis import strategies as st

import streamavg
from streamavg.cli import main
from streamavg.formats import open_checkpoint
from streamavg.sweeps import LastN

ROOT = Path(__file__).parent.parent


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(["equal", "linear", "exp"]),
    alpha=st.floats(0.1, 10),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_running_sums_give_every_last_n_average(scheme, alpha, n, seed):
    stack = np.random.default_rng(seed).normal(size=(n, 5))  # oldest first
    last = LastN(scheme, alpha)
    for k in range(1, n + 1):
        got = last.add({"w": stack[n - k]})["w"]
        w = streamavg.scheme_weights(scheme, k, alpha=alpha)
        np.testing.assert_allclose(got, np.average(stack[n - k :], 0, w), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["k3-keras", "k3-h5", "k2-h5", "k3-weights-f16", "k3-keras-bf16"])
@pytest.mark.parametrize("scheme", ["equal", "linear", "exp"])
def test_sweep_equals_separate_averages_within_one_ulp(checkpoints, case, scheme):
    seen = []

    def evaluate(tensors):
        seen.append(tensors)
        return -float(np.abs(tensors[next(iter(tensors))].astype(np.float64)).sum())

    result = streamavg.sweep([checkpoints / case], scheme, evaluate=evaluate, alpha=1.5)
    assert result.files == tuple(files(checkpoints / case))
    assert list(result.scores) == [1, 2, 3, 4, 5]
    assert result.best == max(result.scores, key=lambda n: (result.scores[n], -n))
    for n, tensors in enumerate(seen, 1):
        want = streamavg.average_tensors([checkpoints / case], scheme=scheme, alpha=1.5, last=n)
        assert tensors.keys() == want.keys()
        for name in want:
            assert tensors[name].dtype == want[name].dtype
            if floating(want[name].dtype):  # 1 ulp is the promise, bfloat16 included
                assert ulp_distance(tensors[name], want[name]) <= 1, (n, name)
            else:
                np.testing.assert_array_equal(tensors[name], want[name])


def test_greedy_soup_never_scores_below_the_best_single_checkpoint(checkpoints):
    directory = checkpoints / "k3-keras"
    target = streamavg.average_tensors([directory], scheme="linear", last=2)

    def evaluate(tensors):  # closeness to a target that no single checkpoint matches
        return -sum(
            float(np.square(tensors[k].astype(np.float64) - target[k]).sum())
            for k in target
            if target[k].dtype.kind == "f"
        )

    soup = streamavg.greedy_soup([directory], evaluate=evaluate)
    assert len(soup.singles) == 5 and len(soup.kept) >= 2
    assert soup.kept[0] == max(soup.singles, key=soup.singles.get)
    assert soup.score >= max(soup.singles.values())
    kept = streamavg.average_tensors(soup.kept, scheme="equal")
    assert soup.score == pytest.approx(evaluate(kept), rel=1e-6)


# -- the tutorial's experiment and `streamavg sweep` on its checkpoints ---------------------


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> tuple[Path, str]:
    """A short run of scripts/tutorial.py: its output directory and what it printed."""
    out = tmp_path_factory.mktemp("tutorial")
    cmd = [sys.executable, str(ROOT / "scripts" / "tutorial.py"), "--epochs", "40"]
    cmd += ["--save-last", "5", "--outdir", str(out), "--json", str(out / "results.json")]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out, printed


def test_tutorial_writes_its_table_json_and_plots(tutorial):
    out, printed = tutorial
    import json

    results = json.loads((out / "results.json").read_text())
    assert list(results) == [
        "single",
        "equal",
        "linear",
        "exp",
        "final_train_acc",
        "final_test_acc",
    ]
    assert list(results["single"]) == ["35", "36", "37", "38", "39"]
    for scheme in ("equal", "linear", "exp"):
        assert list(results[scheme]) == ["1", "2", "3", "4", "5"]
        assert results[scheme]["1"] == results["single"]["39"]  # the last 1 is the newest
    assert all(0 <= v <= 1 for v in results["single"].values())
    for name in ("learning_curves", "average_equal", "average_linear", "average_exp"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert f"{results['equal']['5']:7.4f}" in printed.splitlines()[-9]
    assert printed.count("wrote ") == 5


def test_tutorial_is_deterministic_for_a_seed(tutorial, tmp_path):
    out, _ = tutorial
    cmd = [sys.executable, str(ROOT / "scripts" / "tutorial.py"), "--epochs", "40"]
    cmd += ["--save-last", "5", "--outdir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    subprocess.run(cmd, check=True, capture_output=True)
    assert (tmp_path / "r.json").read_text() == (out / "results.json").read_text()


def test_sweep_command_scores_every_n_and_writes_the_best(tutorial, tmp_path, capsys):
    out, _ = tutorial
    import json

    results = json.loads((out / "results.json").read_text())
    dest = tmp_path / "best.h5"
    code = main(["sweep", str(out / "checkpoints"), "--data", str(out / "test.npz"),
                 "--scheme", "linear", "-o", str(dest)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[0] == "last n  accuracy (linear)"
    scores = {int(line.split()[0]): float(line.split()[1]) for line in printed[1:6]}
    assert scores == {int(n): round(v, 4) for n, v in results["linear"].items()}
    best = max(results["linear"], key=lambda n: (results["linear"][n], -int(n)))
    assert printed[6] == f"best: the last {best} (accuracy {results['linear'][best]:.4f})"
    assert printed[7] == f"wrote {dest}"
    provenance = open_checkpoint(dest).h5.attrs["streamavg"]
    assert '"scheme": "linear"' in provenance and provenance.count(".h5") == int(best)


def test_greedy_soup_command(tutorial, capsys):
    out, _ = tutorial
    code = main(["sweep", str(out / "checkpoints"), "--data", str(out / "test.npz"), "--greedy"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    singles = [float(line.split()[0]) for line in printed[1:6]]
    soup = re.fullmatch(r"soup of (\d) of 5: (.*); accuracy (\d\.\d{4})", printed[6])
    assert soup and float(soup[3]) >= max(singles)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--data", "{out}/no.npz"], 1, "{out}/no.npz: no such file"),
        (["--data", "{out}/x_only.npz"], 1, "{out}/x_only.npz: no array 'y' (needs 'x' and 'y')"),
        (["--data", "{out}/test.npz", "--greedy", "--scheme", "exp"], 2,
         "--greedy averages its soup equally; it takes no --scheme"),
        (["--data", "{out}/test.npz", "--metric", "auc"], 2,
         "--metric auc: not among the model's metrics (accuracy, loss)"),
    ],
)  # fmt: skip
def test_sweep_command_bad_input(tutorial, capsys, args, code, message):
    out, _ = tutorial
    np.savez(out / "x_only.npz", x=np.zeros((3, 2)))
    got = main(["sweep", str(out / "checkpoints"), *[a.format(out=out) for a in args]])
    err = capsys.readouterr().err
    assert got == code
    assert err.startswith(f"streamavg: error: {message.format(out=out)}") and err.count("\n") == 1


def test_sweep_needs_a_model_file(checkpoints, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4)), y=np.zeros((3, 2)))
    directory = checkpoints / "k3-weights"
    assert main(["sweep", str(directory), "--data", str(tmp_path / "d.npz")]) == 2
    newest = files(directory)[-1]
    assert capsys.readouterr().err == (
        f"streamavg: error: {newest}: a keras-weights file holds no model to evaluate; "
        "sweep needs .keras or full-model .h5 checkpoints\n"
    )


# -- which way is better: Keras says, as its own monitor callbacks do -----------------------


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> Path:
    """Four epochs of a model compiled with metrics that go up and down, and held-out data."""
    import keras

    root = tmp_path_factory.mktemp("compiled")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 5)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 96)]
    np.savez(root / "data.npz", x=x, y=y)
    np.savez(root / "bad_labels.npz", x=x, y=y[:, :2])
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(3, activation="softmax")]
    )
    metrics = ["mse", "mae", "categorical_crossentropy", "accuracy", "auc"]
    model.compile(keras.optimizers.SGD(0.3), "categorical_crossentropy", metrics=metrics)
    save = keras.callbacks.ModelCheckpoint(str(root / "ckpt" / "model_{epoch}.keras"))
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[save])
    return root


def Directionless():
    """A custom metric that does not say which way is better (it has no `_direction`)."""
    import keras

    class Spread(keras.metrics.Mean):
        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(keras.ops.std(y_pred), sample_weight)

    return Spread(name="spread")


def test_directions_are_the_ones_keras_callbacks_take(compiled_run):
    import keras

    from streamavg.errors import UsageError
    from streamavg.evaluate import higher_is_better

    data = np.load(compiled_run / "data.npz")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    metrics = ["mse", "mae", "categorical_crossentropy", "accuracy", "auc", Directionless()]
    model.compile("sgd", "categorical_crossentropy", metrics=metrics)
    model.evaluate(data["x"], data["y"], verbose=0)
    for name in ("loss", "val_loss", "mse", "val_mae", "categorical_crossentropy", "accuracy",
                 "val_auc"):  # fmt: skip
        keras_says = keras.callbacks.EarlyStopping(monitor=name, mode="auto")
        keras_says.set_model(model)
        keras_says._set_monitor_op()
        assert higher_is_better(model, name) is (keras_says.monitor_op is keras.ops.greater), name
    with pytest.raises(UsageError) as e:
        higher_is_better(model, "val_spread")
    assert str(e.value) == (
        "metric='val_spread': cannot tell whether higher or lower is better; "
        "pass mode='max' or mode='min'"
    )


@pytest.mark.parametrize("metric", ["mse", "mae", "categorical_crossentropy", "auc"])
def test_sweep_minimises_errors_and_maximises_scores(compiled_run, capsys, metric):
    code = main(["sweep", str(compiled_run / "ckpt"), "--data", str(compiled_run / "data.npz"),
                 "--metric", metric])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    scores = {int(line.split()[0]): float(line.split()[1]) for line in printed[1:5]}
    best = (max if metric == "auc" else min)(scores, key=lambda n: (scores[n], -n))
    assert len(set(scores.values())) > 1  # else any direction would pick the same n
    assert printed[5] == f"best: the last {best} ({metric} {scores[best]:.4f})"


def test_sweep_mode_overrides_the_direction(compiled_run, capsys):
    code = main(["sweep", str(compiled_run / "ckpt"), "--data", str(compiled_run / "data.npz"),
                 "--metric", "mse", "--mode", "max"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    scores = {int(line.split()[0]): float(line.split()[1]) for line in printed[1:5]}
    best = max(scores, key=lambda n: (scores[n], -n))
    assert code == 0 and printed[5] == f"best: the last {best} (mse {scores[best]:.4f})"


def test_sweep_stderr_is_one_line_in_a_fresh_process(compiled_run, tmp_path):
    """What Keras said, unwrapped; and none of TensorFlow's C++ start-up lines, which it
    writes to the process's stderr before any log level applies."""
    data = np.load(compiled_run / "data.npz")
    np.savez(tmp_path / "narrow.npz", x=data["x"][:, :4], y=data["y"])
    cmd = [sys.executable, "-m", "streamavg", "sweep", str(compiled_run / "ckpt")]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([*cmd, "--data", str(tmp_path / "narrow.npz")], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert (out.returncode, out.stdout) == (1, "")
    assert re.fullmatch(  # the layer's name depends on the models built before it
        re.escape(
            f"streamavg: error: {tmp_path / 'narrow.npz'}: Keras cannot evaluate model_4.keras "
            "on x and y (ValueError: Input 0 with name 'None' of layer 'dense"
        )
        + r"(_\d+)?"
        + re.escape(
            "' is incompatible with the layer: expected axis -1 of input shape to have value "
            "5, but received input with shape (None, 4))\n"
        ),
        out.stderr,
    ), out.stderr


def test_sweep_keras_failure_is_one_line(compiled_run, capsys):
    data = compiled_run / "bad_labels.npz"
    code = main(["sweep", str(compiled_run / "ckpt"), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(
        f"streamavg: error: {data}: Keras cannot evaluate model_4.keras on x and y ("
    )


def test_without_keras_sweep_and_callbacks_name_the_extra(checkpoints, tmp_path):
    """Keras made unimportable in a fresh interpreter (as on a core install)."""
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 6)), y=np.zeros((3, 3)))
    args = ["sweep", str(checkpoints / "k3-keras"), "--data", str(tmp_path / "d.npz")]
    hide = "import sys; sys.modules['keras'] = None; "
    sweep = f"from streamavg.cli import main; sys.exit(main({args!r}))"
    out = subprocess.run([sys.executable, "-c", hide + sweep], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (
        2,
        "streamavg: error: streamavg sweep needs Keras: pip install 'streamavg[keras]'\n",
    )
    out = subprocess.run([sys.executable, "-c", hide + "import streamavg.callbacks"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        "ImportError: streamavg.callbacks needs Keras 3: pip install 'streamavg[keras]'"
    )


def test_sweep_refuses_an_output_keras_would_not_load_before_scoring(
    compiled_run, tmp_path, capsys
):
    dest = tmp_path / "best.h5"  # .keras checkpoints: an .h5 name would not load
    code = main(["sweep", str(compiled_run / "ckpt"), "--data", str(compiled_run / "data.npz"),
                 "-o", str(dest)])  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")  # refused before any average was scored
    assert err == (
        f"streamavg: error: {dest}: the inputs are keras files, so Keras reads the output only "
        "under a name ending in .keras\n"
    )
    assert not dest.exists()


def test_sweep_refuses_a_fifo_as_data_at_once(compiled_run, tmp_path, capsys):
    os.mkfifo(fifo := tmp_path / "data.npz")
    code = main(["sweep", str(compiled_run / "ckpt"), "--data", str(fifo)])
    assert (code, capsys.readouterr().err) == (
        1,
        f"streamavg: error: {fifo}: not a regular file (a device, FIFO or socket)\n",
    )
