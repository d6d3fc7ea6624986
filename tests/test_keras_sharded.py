"""Sharded Keras weights, as `model.save_weights("x.weights.json", max_shard_size=...)`
writes them: one checkpoint in a manifest and several shards, read, averaged and written
as one, published so that no crash leaves a manifest whose shards are not all its own."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import killed_while_writing, snapshot, temporary, ulp_distance
from training import FIT, VAL, X, Y, make_model

import streamavg
from streamavg.cli import main
from streamavg.formats import open_checkpoint
from streamavg.select import select_checkpoints

EPOCHS = 10  # the last has two digits
SHARD_GB = 1.4e-7  # 150 bytes: the hidden kernel (128) fills a shard, its bias spills over
QUICK = {**FIT, "batch_size": 32}  # 2 steps an epoch
OUT = "avg.weights.json"
SHARDS = [f"avg_0000{k}.weights.h5" for k in range(3)]  # the model's; 3 more hold the optimizer's


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training run saved sharded after every epoch, in `ckpt/` as `epoch_{e}` and in
    `named/` under ModelCheckpoint-style names with the validation loss (read-only)."""
    root = tmp_path_factory.mktemp("sharded")
    for folder in ("ckpt", "named"):
        (root / folder).mkdir()
    model = make_model(batchnorm=True)

    def save(epoch: int, logs: dict) -> None:
        e = epoch + 1
        for path in (
            root / "ckpt" / f"epoch_{e}.weights.json",
            root / "named" / f"model-{logs['val_loss']:.2f}-{e:02d}.weights.json",
        ):
            model.save_weights(path, max_shard_size=SHARD_GB)

    done = keras.callbacks.LambdaCallback(on_epoch_end=save)
    model.fit(X, Y, validation_data=VAL, epochs=EPOCHS, callbacks=[done], **QUICK)
    return root


def manifests(saved: Path) -> list[Path]:
    return [saved / "ckpt" / f"epoch_{e}.weights.json" for e in range(1, EPOCHS + 1)]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """The trained model's architecture, its optimizer built so that loading sets its state."""
    m = make_model(batchnorm=True)
    m.optimizer.build(m.trainable_variables)
    return m


def load(model: keras.Model, path: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The model's weights (in their dtype) and optimizer variables after `load_weights(path)`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        model.load_weights(str(path))
    numpy = keras.ops.convert_to_numpy
    return {v.path: numpy(v) for v in model.weights}, [numpy(v) for v in model.optimizer.variables]


@pytest.fixture(scope="module")
def inputs(saved: Path, model: keras.Model) -> dict[Path, dict[str, np.ndarray]]:
    """Each checkpoint's weights, as Keras loads them."""
    return {path: load(model, path)[0] for path in manifests(saved)}


def expected(inputs: dict[Path, dict[str, np.ndarray]], scheme: str) -> dict[str, np.ndarray]:
    """The float64 `np.average` of the inputs' weights, in their dtype."""
    w = streamavg.scheme_weights(scheme, len(inputs))
    first = next(iter(inputs.values()))
    return {
        name: np.average(
            np.stack([ws[name].astype(np.float64) for ws in inputs.values()]), axis=0, weights=w
        ).astype(first[name].dtype)
        for name in first
    }


def run(capsys, *args: object) -> tuple[int, str]:
    code = main([*map(str, args), "-q"])
    return code, capsys.readouterr().err


def renamed(weight_map: dict, *, optimizer: bool) -> dict:
    """The newest's weight_map with its shards named for OUT, the optimizer's groups only
    if kept."""
    return {
        group: [name.replace(f"epoch_{EPOCHS}_", "avg_") for name in names]
        for group, names in weight_map.items()
        if optimizer or not group.startswith("/optimizer/")
    }


def test_the_checkpoints_are_sharded_with_a_layer_spilling_into_the_next_shard(saved):
    manifest = json.loads(manifests(saved)[-1].read_text())
    shards = {n for names in manifest["weight_map"].values() for n in names}
    assert len(shards) == 6 and "/optimizer/vars" in manifest["weight_map"]
    assert manifest["weight_map"]["/layers/dense/vars"] == [
        f"epoch_{EPOCHS}_00000.weights.h5",
        f"epoch_{EPOCHS}_00001.weights.h5",
    ]


def test_a_scan_takes_the_manifests_in_epoch_order_never_a_shard(saved):
    assert select_checkpoints([saved / "ckpt"]) == (tuple(manifests(saved)), False, (), ())
    named = sorted((saved / "named").glob("*.json"), key=lambda p: p.name[-15:])  # by epoch
    assert [p.name[-15:-13] for p in named] == [f"{e:02d}" for e in range(1, EPOCHS + 1)]
    assert select_checkpoints([saved / "named"]).paths == tuple(named)
    with open_checkpoint(named[-1]) as ck:
        assert ck.format == "keras-sharded"
        assert ck.tensors["layers/dense/vars/1"].shape == (8,)  # the bias, in the next shard


@pytest.mark.parametrize("scheme", ["equal", "linear"])
def test_the_average_loads_and_is_within_one_ulp(saved, model, inputs, tmp_path, capsys, scheme):
    out = tmp_path / OUT
    assert run(capsys, saved / "ckpt", "-o", out, "--scheme", scheme) == (0, "")
    got, _ = load(model, out)
    want = expected(inputs, scheme)
    assert got.keys() == want.keys()
    for name in want:
        assert ulp_distance(got[name], want[name]) <= 1, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUT, *SHARDS]  # optimizer's dropped
    newest = json.loads(manifests(saved)[-1].read_text())
    manifest = json.loads(out.read_text())
    assert manifest["weight_map"] == renamed(newest["weight_map"], optimizer=False)
    total = manifest["metadata"]["total_size"]
    assert (total, type(total)) == (float(sum(w.nbytes for w in want.values())), float)
    assert manifest["metadata"]["streamavg"]["scheme"] == scheme


def test_the_same_inputs_give_the_same_bytes_whatever_the_memory(saved, tmp_path, capsys):
    for folder, extra in (("a", []), ("b", []), ("c", ["--max-memory", "1M"])):
        assert run(capsys, saved / "ckpt", "-o", tmp_path / folder / OUT, *extra) == (0, "")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b") == snapshot(tmp_path / "c")
    assert len(snapshot(tmp_path / "a")) == 4


def test_optimizer_newest_keeps_the_newest_optimizer_state(saved, model, inputs, tmp_path, capsys):
    out = tmp_path / OUT
    assert run(capsys, saved / "ckpt", "-o", out, "--optimizer", "newest") == (0, "")
    newest = json.loads(manifests(saved)[-1].read_text())
    manifest = json.loads(out.read_text())
    assert manifest["weight_map"] == renamed(newest["weight_map"], optimizer=True)
    assert manifest["metadata"]["total_size"] == newest["metadata"]["total_size"]  # as Keras
    _, want = load(model, manifests(saved)[-1])
    _, first = load(model, manifests(saved)[0])
    assert not all(np.array_equal(a, b) for a, b in zip(first, want, strict=True))
    weights, state = load(model, out)
    assert all(np.array_equal(a, b) for a, b in zip(state, want, strict=True))
    average = expected(inputs, "equal")
    assert all(ulp_distance(weights[n], average[n]) <= 1 for n in average)


def test_an_earlier_output_beside_the_checkpoints_is_left_out_with_its_shards(saved, tmp_path):
    folder = Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))
    output = folder / "epoch_99.weights.json"
    streamavg.average([folder], output=output)
    sel = select_checkpoints([folder])
    assert sel.paths == tuple(folder / p.name for p in manifests(saved))
    assert sel.notes == (f"left out {output}: an earlier streamavg output",)


def test_naming_a_shard_is_refused(saved, capsys):
    ckpt = saved / "ckpt"
    before = snapshot(saved)
    first, second = ckpt / "epoch_1_00000.weights.h5", ckpt / "epoch_3_00001.weights.h5"
    for args, shard, owner in (
        ([first], first, 1),
        ([first, ckpt / "epoch_2_00000.weights.h5"], first, 1),
        ([ckpt / "epoch_2.weights.json", second], second, 3),
    ):
        assert run(capsys, *args) == (
            1,
            f"streamavg: error: {shard}: a part of checkpoint "
            f"{ckpt / f'epoch_{owner}.weights.json'}; name that instead\n",
        )
    assert snapshot(saved) == before


def edit_map(change):
    def damage(manifest: Path) -> None:
        data = json.loads(manifest.read_text())
        change(data["weight_map"])
        manifest.write_text(json.dumps(data))

    return damage


def set_group(group: str, value: object):
    return edit_map(lambda weight_map: weight_map.__setitem__(group, value))


def repeat_group(manifest: Path) -> None:
    """DENSE listed twice, first naming no shard: where the last value wins, it is unseen."""
    text = manifest.read_text().replace('"weight_map": {', f'"weight_map": {{"{DENSE}": [], ', 1)
    manifest.write_text(text)


def copy_kernel_into_the_next_shard(manifest: Path) -> None:
    with (
        h5py.File(manifest.with_name("epoch_2_00000.weights.h5")) as src,
        h5py.File(manifest.with_name("epoch_2_00001.weights.h5"), "a") as dst,
    ):
        src.copy("layers/dense/vars/0", dst["layers/dense/vars"])


DENSE = "/layers/dense/vars"
# how the manifest of epoch 2 is damaged -> the message after "{manifest}: "
HOSTILE = {
    "escaping shard name": (
        set_group(DENSE, ["../ckpt/epoch_2_00000.weights.h5"]),
        f"{DENSE}: '../ckpt/epoch_2_00000.weights.h5' is not a file name in this folder",
    ),
    "absolute shard name": (
        set_group(DENSE, "/etc/passwd"),
        f"{DENSE}: '/etc/passwd' is not a file name in this folder",
    ),
    "missing shard": (
        lambda m: m.with_name("epoch_2_00001.weights.h5").unlink(),
        "epoch_2_00001.weights.h5: missing "
        "(a damaged checkpoint: a manifest pointing at missing shards)",
    ),
    "not JSON": (
        lambda m: m.write_bytes(m.read_bytes()[:100]),
        "corrupt sharded-weights manifest (not UTF-8 JSON)",
    ),
    "nested too deeply": (
        lambda m: m.write_text('{"metadata": ' + "[" * 100_000),
        "corrupt sharded-weights manifest (nested too deeply)",
    ),
    "lone surrogate in a shard name": (
        set_group(DENSE, ["\ud800"]),  # written as the escape "\ud800", which UTF-8 cannot hold
        "corrupt sharded-weights manifest (not UTF-8 JSON)",
    ),
    "group listed twice": (repeat_group, f"{DENSE}: listed twice"),
    "not a manifest": (
        lambda m: m.write_text('{"weights": {}}'),
        'corrupt sharded-weights manifest (not {"metadata": {...}, "weight_map": {...}})',
    ),
    "no shards": (
        edit_map(dict.clear),
        "corrupt sharded-weights manifest (its weight_map lists no shards)",
    ),
    "too large": (
        lambda m: os.truncate(m, (64 << 20) + 1),  # sparse: nothing is written, or read
        f"sharded-weights manifest of {(64 << 20) + 1:,} bytes, over the limit of {64 << 20:,}",
    ),
    "not shard names": (
        set_group(DENSE, [3]),
        f"{DENSE}: not a shard file name or a list of them",
    ),
    "tensor in two shards": (
        copy_kernel_into_the_next_shard,
        "layers/dense/vars/0: in two shards, epoch_2_00000.weights.h5 and epoch_2_00001.weights.h5",
    ),
    "shard not listed for its group": (
        set_group(DENSE, ["epoch_2_00000.weights.h5"]),
        "layers/dense/vars/1: in shard epoch_2_00001.weights.h5, "
        f"which the weight_map does not list for {DENSE}",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_manifests_are_refused_in_one_line(saved, tmp_path, capsys, name):
    damage, message = HOSTILE[name]
    folder = Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))
    victims = [folder / p.name for p in manifests(saved)[:3]]
    damage(victims[1])
    before = snapshot(folder)
    out = tmp_path / "out" / OUT
    assert run(capsys, *victims, "-o", out) == (1, f"streamavg: error: {victims[1]}: {message}\n")
    assert snapshot(folder) == before and not out.parent.exists()


# -- faults: crashes, a full disk, outputs replaced -----------------------------------------

#: The CLI, made to die as by SIGKILL before its Nth (0-based) rename, link or unlink.
CRASH = """
import os, sys
from streamavg.cli import main
left = int(sys.argv[1])
def dying(real):
    def call(*args, **kwargs):
        global left
        if left == 0:
            os._exit(99)
        left -= 1
        return real(*args, **kwargs)
    return call
os.link, os.replace, os.unlink = map(dying, (os.link, os.replace, os.unlink))
sys.exit(main(sys.argv[2:]))
"""
#: The CLI, with another run putting a manifest at the output just before it does.
RACE = """
import os, sys
from streamavg.cli import main
real = os.link
def link(src, dst):
    if str(dst).endswith(".weights.json"):
        with open(dst, "x") as f:
            f.write("{}")
    return real(src, dst)
os.link = link
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_at_any_step_of_replacing_an_output_leaves_old_or_new_never_a_mix(
    saved, model, tmp_path, capsys
):
    """Before each rename and unlink in turn, a run replacing an output dies; the manifest
    is then absent or loads all of one average, the old or the new. The next run removes
    every leftover and puts the new average in place."""
    ckpt, pristine = saved / "ckpt", tmp_path / "pristine"
    assert run(capsys, *manifests(saved)[:3], "-o", pristine / OUT) == (0, "")
    assert run(capsys, ckpt, "-o", tmp_path / "new" / OUT) == (0, "")
    old, new = load(model, pristine / OUT)[0], load(model, tmp_path / "new" / OUT)[0]
    steps = range(8)
    for step in steps:
        shutil.copytree(pristine, tmp_path / f"step_{step}")
    args = [str(ckpt), "--overwrite", "-q", "-o"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CRASH, str(step), *args, str(tmp_path / f"step_{step}" / OUT)],
            stdout=subprocess.DEVNULL,
        )
        for step in steps
    ]
    codes = [r.wait() for r in runs]
    assert 0 in codes and codes.index(0) >= 5  # died at the old manifest's unlink, 4 renames
    assert codes == [99] * codes.index(0) + [0] * (len(codes) - codes.index(0))
    for step in steps[: codes.index(0)]:
        folder = tmp_path / f"step_{step}"
        if (folder / OUT).exists():
            got = load(model, folder / OUT)[0]
            assert any(all(np.array_equal(got[n], w[n]) for n in w) for w in (old, new)), step
        assert temporary(folder)
        assert run(capsys, ckpt, "-o", folder / OUT, "--overwrite") == (0, "")
        assert snapshot(folder) == snapshot(tmp_path / "new")  # no temporary or stale file


def test_a_run_that_loses_the_race_for_the_name_takes_its_shards_back(saved, tmp_path):
    out = tmp_path / OUT
    cmd = [sys.executable, "-c", RACE, str(saved / "ckpt"), "-o", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"streamavg: error: {out}: already exists (pass --overwrite to replace it)\n",
    )
    assert [p.name for p in tmp_path.iterdir()] == [OUT] and out.read_text() == "{}"


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 manifests of one 6 MB sharded checkpoint (two shards): averaging them takes long
    enough to kill a run while it writes, and fills a shard past a file size limit."""
    root = tmp_path_factory.mktemp("slow")
    big = keras.Sequential(
        [keras.Input((500,)), keras.layers.Dense(1000), keras.layers.Dense(1000)]
    )
    big.save_weights(root / "big.weights.json", max_shard_size=0.005)
    for i in range(40):
        os.link(root / "big.weights.json", root / f"model_{i:03d}.weights.json")
    (root / "big.weights.json").unlink()
    return root


def test_killed_while_writing_leaves_nothing_loadable_and_the_next_run_cleans_up(slow, tmp_path):
    out = tmp_path / OUT
    killed_while_writing(tmp_path, slow, "-o", out)
    assert not out.exists() and temporary(tmp_path)
    again = [slow / "model_000.weights.json", "-o", out, "-q"]
    assert subprocess.run([sys.executable, "-m", "streamavg", *map(str, again)]).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUT, *SHARDS[:2]]


def test_a_full_disk_gives_one_line_and_leaves_nothing(slow, tmp_path):
    """Each shard's data fits the file size limit (so the check before starting passes),
    but the larger shard, with its metadata, does not."""
    newest = slow / "model_039.weights.json"
    with open_checkpoint(newest) as ck:
        limit = max(sum(t.nbytes for t in shard.tensors.values()) for shard in ck.shards)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out" / OUT
    cmd = [sys.executable, "-m", "streamavg", str(newest), "-o", str(out), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"streamavg: error: {out}: cannot write (File too large)\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_two_runs_replacing_one_output_never_mix(slow, tmp_path, capsys):
    """Both finish; the output is all of one run's or all of the other's, never a blend."""
    picks = [["--last", "40"], ["--last", "39"]]  # alike but for their provenance
    for i, pick in enumerate(picks):
        assert run(capsys, slow, *pick, "-o", tmp_path / f"ref_{i}" / OUT) == (0, "")
    out = tmp_path / "out" / OUT
    cmd = [sys.executable, "-m", "streamavg", str(slow), "-o", str(out), "--overwrite", "-q"]
    runs = [subprocess.Popen([*cmd, *pick], stdout=subprocess.DEVNULL) for pick in picks]
    assert [r.wait() for r in runs] == [0, 0]
    assert snapshot(out.parent) in [snapshot(tmp_path / f"ref_{i}") for i in range(2)]


def test_overwrite_replaces_an_output_and_its_shards(saved, model, inputs, tmp_path, capsys):
    ckpt, out = saved / "ckpt", tmp_path / OUT
    assert run(capsys, ckpt, "-o", out, "--optimizer", "newest") == (0, "")
    assert len(list(tmp_path.iterdir())) == 7
    assert run(capsys, *manifests(saved)[:3], "-o", out) == (
        2,
        f"streamavg: error: {out}: already exists (pass --overwrite to replace it)\n",
    )
    assert run(capsys, *manifests(saved)[:3], "-o", out, "--overwrite") == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [OUT, *SHARDS]  # no stale shard
    got = load(model, out)[0]
    want = expected({p: inputs[p] for p in manifests(saved)[:3]}, "equal")
    assert all(ulp_distance(got[n], want[n]) <= 1 for n in want)


def test_shard_names_taken_are_refused_before_writing(saved, tmp_path, capsys):
    """A leftover shard without its manifest, or another checkpoint's shard (an input's,
    here: Keras drops every ".weights" from the manifest's name to name its shards)."""
    (tmp_path / SHARDS[1]).write_bytes(b"")
    assert run(capsys, saved / "ckpt", "-o", tmp_path / OUT) == (
        2,
        f"streamavg: error: {tmp_path / SHARDS[1]}: already exists "
        "(pass --overwrite to replace it)\n",
    )
    folder = Path(shutil.copytree(saved / "ckpt", tmp_path / "ckpt"))
    before = snapshot(folder)
    out = folder / "epoch_1.weights.weights.json"
    assert run(capsys, folder, "-o", out, "--overwrite") == (
        2,
        f"streamavg: error: {folder / 'epoch_1_00000.weights.h5'}: a shard of "
        f"{folder / 'epoch_1.weights.json'}; name the output otherwise\n",
    )
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHARDS[1], "ckpt"]
