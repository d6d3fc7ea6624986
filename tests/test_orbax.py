"""Orbax checkpoints as keras.callbacks.OrbaxCheckpoint writes them (JAX backend): the steps
of a root are averaged, and the average loads back with `model.load_weights(out)` and
`keras.models.load_model(out)` within one ulp of np.average in float64.

Keras runs in subprocesses with KERAS_BACKEND=jax (this process may have another backend,
or none): one writes the checkpoints and each step's weights as Keras reads them back, one
loads every average. Skipped where JAX, Orbax or TensorStore are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import killed_while_writing, snapshot, ulp_distance

pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("tensorstore")

import streamavg
from streamavg.blocks import block_shape, blocks
from streamavg.cli import main
from streamavg.errors import StreamavgError
from streamavg.formats import averaged_by_streamavg, is_checkpoint_dir, open_checkpoint, orbax
from streamavg.formats.base import Reader
from streamavg.select import select_checkpoints

STEPS = 5  # epochs, saved as steps 0..4
POLICIES = {"f32": "float32", "bf16": "bfloat16"}

# `python -c KERAS make NPZ POLICY:ROOT...` trains one run per dtype policy, saving each
# epoch with OrbaxCheckpoint, and saves each step's weights as Keras loads them back;
# `... load NPZ POLICY:OUT...` saves what load_weights and load_model read from each average.
KERAS = textwrap.dedent(
    """
    import os, shutil, sys, tempfile, warnings
    os.environ["KERAS_BACKEND"] = "jax"
    warnings.filterwarnings("ignore")
    import numpy as np, keras

    def build():  # all named, so that every model built here has the same variable paths
        i = keras.Input((6,))
        h = keras.layers.Dense(16, activation="relu", name="dense")(i)
        h = keras.layers.BatchNormalization(name="batch_normalization")(h)
        model = keras.Model(i, keras.layers.Dense(3, name="dense_1")(h))
        # (Adam left these bfloat16 weights unchanged, epoch after epoch, in Keras 3.15 on JAX)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9, name="sgd"), "mse", metrics=["mae"])
        model.optimizer.build(model.trainable_variables)  # else load_weights skips its state
        return model

    def state(model):
        return {"weights": model.get_weights(), "iterations": int(model.optimizer.iterations)}

    mode, npz, *jobs = sys.argv[1:]
    found = {}
    for job in jobs:
        policy, path = job.split(":", 1)
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(1)
        if mode == "make":
            x = np.random.rand(64, 6).astype("float32")
            y = np.random.rand(64, 3).astype("float32")
            cb = keras.callbacks.OrbaxCheckpoint(path, save_freq="epoch", max_to_keep=10)
            build().fit(x, y, epochs=STEPS, batch_size=16, callbacks=[cb], verbose=0)
            with tempfile.TemporaryDirectory() as tmp:  # each step alone in a root, for Keras
                for step in sorted(os.listdir(path), key=int):
                    shutil.copytree(os.path.join(path, step), os.path.join(tmp, step, step))
                    model = build()
                    model.load_weights(os.path.join(tmp, step))
                    found[f"{path}|{step}"] = state(model)
        else:
            model = build()
            model.load_weights(path)
            found[f"{path}|load_weights"] = state(model)
            found[f"{path}|load_model"] = state(keras.models.load_model(path))
    weights = {  # bfloat16 as its bits: .npz has no such dtype
        f"{k}:{i}:{w.dtype.name}": w.view(f"u{w.itemsize}") if w.dtype.kind == "V" else w
        for k, s in found.items() for i, w in enumerate(s["weights"])
    }
    np.savez(npz, **weights, **{f"{k}:iterations:": s["iterations"] for k, s in found.items()})
    """
).replace("STEPS", str(STEPS))


def keras(*args: object) -> None:
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", KERAS, *map(str, args)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def loaded(npz: Path) -> dict[str, dict]:
    """{key: {"weights": [...], "iterations": n}} as the subprocess saved it."""
    found: dict[str, dict] = {}
    with np.load(npz) as data:
        for name in data.files:
            key, what, dtype = name.rsplit(":", 2)
            entry = found.setdefault(key, {"weights": {}, "iterations": None})
            if what == "iterations":
                entry["iterations"] = int(data[name])
            else:
                entry["weights"][int(what)] = data[name].view(
                    np.dtype(getattr(ml_dtypes, dtype, dtype))
                )
    for entry in found.values():
        entry["weights"] = [entry["weights"][i] for i in sorted(entry["weights"])]
    return found


# (case, policy) -> how the average is made: through the CLI or the API, and its weights
# from the steps' order (oldest first).
CASES = {
    "cli-equal": lambda root, out: main([str(root), "-o", str(out)]),
    "api-linear": lambda root, out: streamavg.average([root], scheme="linear", output=out),
    "cli-last2": lambda root, out: main([str(root), "-o", str(out), "--last", "2"]),
    "cli-optimizer": lambda root, out: main([str(root), "-o", str(out), "--optimizer", "newest"]),
}
WEIGHTS = {
    "cli-equal": [1.0] * STEPS,
    "api-linear": [i / STEPS for i in range(1, STEPS + 1)],
    "cli-last2": [0.0] * (STEPS - 2) + [1.0, 1.0],
    "cli-optimizer": [1.0] * STEPS,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """For each policy: the Orbax root, each step's weights, every case's average, and what
    Keras loads from each (one subprocess trains both runs, one loads every average)."""
    base = tmp_path_factory.mktemp("orbax")
    roots = {key: base / key for key in POLICIES}
    keras("make", base / "steps.npz", *(f"{POLICIES[k]}:{r}" for k, r in roots.items()))
    steps = loaded(base / "steps.npz")
    outs = {k: {case: base / "averages" / f"{k}-{case}" for case in CASES} for k in POLICIES}
    for key, root in roots.items():
        for case, out in outs[key].items():
            done = CASES[case](root, out)
            assert done == 0 or done.output == out
    jobs = [f"{POLICIES[k]}:{out}" for k in POLICIES for out in outs[k].values()]
    keras("load", base / "loaded.npz", *jobs)
    found = loaded(base / "loaded.npz")
    return {
        key: {
            "root": root,
            "steps": {str(s): steps[f"{root}|{s}"] for s in range(STEPS)},
            "outs": outs[key],
            "loaded": found,
        }
        for key, root in roots.items()
    }


@pytest.mark.parametrize("how", ["load_weights", "load_model"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("key", sorted(POLICIES))
def test_average_loads_within_one_ulp(runs, key, case, how):
    run = runs[key]
    got = run["loaded"][f"{run['outs'][case]}|{how}"]["weights"]
    steps = [run["steps"][str(s)]["weights"] for s in range(STEPS)]
    w = WEIGHTS[case]
    assert len(got) == len(steps[0]) == 8  # 2 dense kernels and biases, 4 batch-norm
    for k, g in enumerate(got):
        stack = np.array([s[k].astype(np.float64) for s in steps])
        want = np.average(stack, axis=0, weights=w).astype(steps[-1][k].dtype)
        assert g.dtype == want.dtype and g.shape == want.shape
        assert ulp_distance(g, want) <= 1, (case, how, k)
    # all steps differ, so the average is none of them
    assert not np.array_equal(got[0], steps[-1][0])


def test_optimizer_state_dropped_or_kept(runs):
    run = runs["f32"]
    newest = run["steps"][str(STEPS - 1)]["iterations"]
    assert newest > 0
    for case in ("cli-equal", "cli-optimizer"):
        out = run["outs"][case]
        meta = json.loads((out / str(STEPS - 1) / "pytree" / "_METADATA").read_text())
        kept = any("optimizer_variables" in k for k in meta["tree_metadata"])
        assert kept == (case == "cli-optimizer")
        for how in ("load_weights", "load_model"):
            iterations = run["loaded"][f"{out}|{how}"]["iterations"]
            assert iterations == (newest if kept else 0), (case, how)


def test_listing(runs):
    step = runs["bf16"]["root"] / str(STEPS - 1)
    with open_checkpoint(step) as ck:
        assert ck.format == "orbax" and isinstance(ck, Reader)  # the adapter contract
        parts = {n: t.part for n, t in ck.tensors.items()}
        model = sorted(n for n, p in parts.items() if p == "model")
        assert model == [
            "batch_normalization/beta",
            "batch_normalization/gamma",
            "batch_normalization/moving_mean",
            "batch_normalization/moving_variance",
            "dense/bias",
            "dense/kernel",
            "dense_1/bias",
            "dense_1/kernel",
        ]
        assert {n for n, p in parts.items() if p == "other"} >= {"metrics_variables/loss/count"}
        assert "optimizer" not in parts.values()
        assert str(ck.tensors["dense/kernel"].dtype) == "bfloat16"
        assert ck.tensors["dense/kernel"].shape == (6, 16)
        # a block, read into the caller's buffer, is that block of the whole
        whole = ck.read_whole("dense/kernel")
        out = np.empty((2, 16), ck.tensors["dense/kernel"].stored)
        ck.read("dense/kernel", (slice(3, 5),), out)
        assert np.array_equal(out, whole[3:5])
    with open_checkpoint(step, optimizer=True) as ck:
        iteration = ck.tensors["optimizer_variables/sgd/iteration"]
        assert iteration.part == "optimizer" and iteration.dtype.kind == "i"


def test_steps_are_ordered_and_selected(runs):
    root = runs["f32"]["root"]
    steps = [root / str(s) for s in range(STEPS)]
    assert not is_checkpoint_dir(root) and all(is_checkpoint_dir(s) for s in steps)
    assert select_checkpoints([root]).paths == tuple(steps)
    assert select_checkpoints([root], last=2).paths == tuple(steps[-2:])
    assert select_checkpoints([root], epochs="1:3").paths == tuple(steps[1:4])


def test_steps_being_written_are_left_out(runs, tmp_path):
    root = Path(shutil.copytree(runs["f32"]["root"], tmp_path / "run"))
    shutil.copytree(root / "4", root / "5.orbax-checkpoint-tmp")  # as Orbax names a step in flight
    assert not is_checkpoint_dir(root / "5.orbax-checkpoint-tmp")
    assert select_checkpoints([root]).paths == tuple(root / str(s) for s in range(STEPS))


def test_a_step_changed_while_read_is_refused(runs, tmp_path):
    step = Path(shutil.copytree(runs["f32"]["root"] / "4", tmp_path / "run" / "4"))
    with open_checkpoint(step) as ck:
        ck.check_unchanged()
        manifest = step / "pytree" / "manifest.ocdbt"
        os.utime(manifest, ns=(0, manifest.stat().st_mtime_ns + 10**9))
        with pytest.raises(StreamavgError, match="changed while being averaged"):
            ck.check_unchanged()


def test_output_is_one_step_with_provenance(runs):
    run = runs["f32"]
    out = run["outs"]["cli-last2"]
    assert sorted(p.name for p in out.iterdir()) == [str(STEPS - 1)]
    assert is_checkpoint_dir(out) and averaged_by_streamavg(out)
    assert not averaged_by_streamavg(run["root"] / "0")
    with open_checkpoint(out) as ck:
        assert ck.provenance["files"] == [str(STEPS - 2), str(STEPS - 1)]
        assert ck.provenance["weights"] == [0.5, 0.5]
    newest = run["root"] / str(STEPS - 1)
    for name in ("_CHECKPOINT_METADATA", "model_config"):  # copied from the newest
        a, b = out / str(STEPS - 1) / name, newest / name
        assert (snapshot(a) == snapshot(b)) if a.is_dir() else a.read_bytes() == b.read_bytes()


def test_same_inputs_same_bytes_and_overwrite(runs, tmp_path):
    root = runs["f32"]["root"]
    assert main([str(root), "-o", str(tmp_path / "a")]) == 0
    assert main([str(root), "-o", str(tmp_path / "b")]) == 0
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert snapshot(tmp_path / "a") == snapshot(runs["f32"]["outs"]["cli-equal"])
    # an earlier output is replaced with --overwrite, not written into
    assert main([str(root), "-o", str(tmp_path / "a"), "--last", "2", "--overwrite"]) == 0
    assert snapshot(tmp_path / "a") == snapshot(runs["f32"]["outs"]["cli-last2"])


def test_average_of_averages_reads_our_own_layout(runs, tmp_path):
    run = runs["f32"]
    outs = [tmp_path / "avg_1", tmp_path / "avg_2"]
    for case, out in zip(("cli-equal", "cli-last2"), outs, strict=True):
        shutil.copytree(run["outs"][case], out)
    result = streamavg.average(outs, output=tmp_path / "avg")
    got = streamavg.average_tensors([result.output])
    with open_checkpoint(outs[0]) as a, open_checkpoint(outs[1]) as b:
        for name, values in got.items():
            want = (a.read_whole(name).astype(np.float64) + b.read_whole(name)) / 2
            assert ulp_distance(values, want.astype(values.dtype)) <= 1


def test_blocks_smaller_than_chunks(runs, tmp_path, monkeypatch):
    """Blocks that fill a chunk only in part, in any order, are gathered until the chunk is
    whole, and each chunk is written once."""
    monkeypatch.setattr(orbax, "CHUNK_BYTES", 40)  # 10 floats: a kernel row of 16 is 2 chunks
    out = tmp_path / "small"
    with open_checkpoint(runs["f32"]["root"] / str(STEPS - 1)) as ck:
        fresh = [t for t in ck.tensors.values() if t.averaged]
        pieces = [(t, index) for t in fresh for index in blocks(t.shape, 3)]
        order = np.random.default_rng(0).permutation(len(pieces))
        with ck.write_like(
            out, [t.name for t in fresh], optimizer=False, provenance={}, overwrite=False
        ) as write:
            for k in order:
                t, index = pieces[k]
                values = np.empty(block_shape(t.shape, index), t.stored)
                ck.read(t.name, index, values)
                write(t.name, values, index)
        with open_checkpoint(out) as copy:
            assert copy.tensors == ck.tensors
            for name in ck.tensors:
                assert np.array_equal(copy.read_whole(name), ck.read_whole(name)), name
    kernel = out / str(STEPS - 1) / "pytree" / "trainable_variables.dense.kernel"
    meta = json.loads((kernel / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 10]
    assert len(list((kernel / "c").rglob("*"))) == 6 + 6 * 2  # 6 row folders, 12 chunks


MESSAGE = (
    "{}: an Orbax checkpoint; reading it needs the orbax extra (pip install 'streamavg[orbax]')"
)


def test_without_tensorstore_in_process(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # import fails
    root = runs["f32"]["root"]
    assert main([str(root), "-o", str(tmp_path / "out")]) == 2  # usage: not installed
    assert capsys.readouterr().err == f"streamavg: error: {MESSAGE.format(root / '4')}\n"
    assert not (tmp_path / "out").exists()


# -- damaged inputs, failed and killed writes --------------------------------------------


def damaged(runs, tmp_path, damage) -> Path:
    """A copy of the f32 run whose step 1 `damage(step)` has broken."""
    root = Path(shutil.copytree(runs["f32"]["root"], tmp_path / "run"))
    damage(root / "1")
    return root


def test_a_step_without_its_manifest_is_refused(runs, tmp_path, capsys):
    root = damaged(runs, tmp_path, lambda step: (step / "pytree" / "manifest.ocdbt").unlink())
    before = snapshot(root)
    assert main([str(root), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {root / '1'}: incomplete Orbax checkpoint (no manifest.ocdbt)\n"
    )
    assert snapshot(root) == before and not (tmp_path / "out").exists()


def test_corrupt_tree_metadata_is_refused(runs, tmp_path, capsys):
    root = damaged(runs, tmp_path, lambda step: (step / "pytree" / "_METADATA").write_text("{"))
    assert main([str(root), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"streamavg: error: {root / '1'}: corrupt Orbax metadata in _METADATA (")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_failed_write_leaves_no_output_and_no_temporary_folder(runs, tmp_path):
    """The file size limit stops the writer part way: one line, no output folder, and no
    temporary folder left beside it."""
    out = tmp_path / "out" / "avg"
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
    run = f"{limit}import sys; from streamavg.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run, str(runs["f32"]["root"]), "-o", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"streamavg: error: {out}: cannot write (")
    assert done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # the folder made for the output went too


BIG = textwrap.dedent(
    """
    import os, sys, warnings
    os.environ["KERAS_BACKEND"] = "jax"
    warnings.filterwarnings("ignore")
    import numpy as np, keras
    i = keras.Input((1000,))
    model = keras.Model(i, keras.layers.Dense(4000, name="dense")(i))
    model.compile(keras.optimizers.SGD(name="sgd"), "mse")
    cb = keras.callbacks.OrbaxCheckpoint(sys.argv[1], save_freq="epoch")
    x, y = np.ones((2, 1000), "float32"), np.ones((2, 4000), "float32")
    model.fit(x, y, callbacks=[cb], verbose=0)
    """
)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 steps, hard links to one step of a 16 MB model: a run long enough to be killed."""
    base = tmp_path_factory.mktemp("orbax-slow")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", BIG, str(base / "one")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (step,) = (base / "one").iterdir()
    for k in range(40):
        for src in step.rglob("*"):
            dst = base / "root" / str(k) / src.relative_to(step)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
    return base / "root"


def test_a_killed_run_leaves_no_output_and_the_next_run_cleans_up(slow, tmp_path):
    out = tmp_path / "avg"
    _, temp = killed_while_writing(tmp_path, slow, "-o", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [temp]
    assert temp.name.startswith(".avg.streamavg-") and temp.is_dir()
    assert main([str(slow), "--last", "2", "-o", str(tmp_path / "again"), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_orbax_checkpoints_in_s3_average_to_the_bytes_of_a_local_run(runs, tmp_path, s3):
    """TensorStore reads the steps from moto's S3 server on loopback (its s3 driver)."""
    from conftest import put_tree, tree

    root = runs["f32"]["root"]
    url = put_tree(s3, root, "bkt/orbax")
    local = streamavg.average([root], scheme="linear", output=tmp_path / "local")
    remote = streamavg.average([url], scheme="linear", output=tmp_path / "remote")
    assert [str(f) for f in remote.files] == [f"{url}/{f.name}" for f in local.files]
    assert tree(remote.output) == tree(local.output)


def test_the_dask_fold_refuses_an_orbax_output_in_one_line(runs, tmp_path, capsys):
    """TensorStore writes each array as one compressed chunk: a worker has no place in a
    file to write its tensors at, so the refusal says so, and what to do instead."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        argv = [str(runs["f32"]["root"]), "-o", str(tmp_path / "avg"), "--scheduler"]
        assert main([*argv, cluster.scheduler_address]) == 2
    assert capsys.readouterr().err == (
        "streamavg: error: the Dask fold cannot write an Orbax checkpoint: TensorStore "
        "compresses each array into one chunk, which has no fixed place in a file for a "
        "worker to write; average Orbax checkpoints in one process\n"
    )
    assert not (tmp_path / "avg").exists()
