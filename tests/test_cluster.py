"""The fold on a real Dask cluster: a scheduler and two worker processes on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import ExitStack

import h5py
import numpy as np
import pytest
from conftest import CREDENTIALS, put_tree, tree
from distributed import Client, LocalCluster, get_task_stream

import streamavg
from streamavg import cluster
from streamavg.cli import main
from streamavg.engine import open_all, to_average
from streamavg.errors import StreamavgError

CASES = {
    "k3-keras": ".keras",
    "k3-keras-bf16": ".keras",
    "k3-weights": ".weights.h5",
    "k3-h5": ".h5",
    "k2-h5": ".h5",
}


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as workers,
        Client(workers) as c,
    ):
        yield c


@pytest.mark.parametrize("case", CASES)
def test_the_cluster_writes_the_bytes_a_local_run_writes(
    checkpoints, tmp_path, client, monkeypatch, case
):
    suffix = CASES[case]
    local = streamavg.average([checkpoints / case], scheme="linear", output=tmp_path / f"a{suffix}")
    monkeypatch.setattr(cluster, "TASK_BYTES", 1)  # a task per tensor: several per worker
    with get_task_stream(client) as tasks:
        spread = streamavg.average(
            [checkpoints / case], scheme="linear", output=tmp_path / f"b{suffix}", client=client
        )
    assert spread.output.read_bytes() == local.output.read_bytes()
    keys = {str(t["key"]) for t in tasks.data}
    assert len(keys) > 2 and all(k.startswith("streamavg-fold-") for k in keys)
    assert {t["worker"] for t in tasks.data} == set(client.scheduler_info()["workers"])


def test_the_command_line_folds_on_a_scheduler(checkpoints, tmp_path, client, capsys):
    local, spread = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    assert main([str(checkpoints / "k3-weights"), "-o", str(local), "-q"]) == 0
    address = client.scheduler.address
    assert (
        main([str(checkpoints / "k3-weights"), "-o", str(spread), "-q", "--scheduler", address])
        == 0
    )
    assert spread.read_bytes() == local.read_bytes()


def test_a_task_that_fails_stops_the_run_in_one_line_and_leaves_nothing(
    case_copy, tmp_path, client, capsys
):
    ckpts = case_copy("k3-weights")
    with h5py.File(ckpts / "model_3.weights.h5", "a") as f:
        f["layers/dense/vars/1"][0] = np.nan
    out = tmp_path / "out"
    out.mkdir()
    before = {p: p.read_bytes() for p in ckpts.iterdir()}
    argv = [str(ckpts), "-o", str(out / "avg.weights.h5"), "--scheduler", client.scheduler.address]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {ckpts}/model_3.weights.h5: layers/dense/vars/1: contains NaN or Inf "
        "(pass --allow-nonfinite to average anyway)\n"
    )
    assert list(out.iterdir()) == []
    assert {p: p.read_bytes() for p in ckpts.iterdir()} == before


@pytest.mark.parametrize("case", ["keras-sharded", "keras-dir", "safetensors", "safetensors-dir"])
def test_outputs_of_several_files_are_written_by_the_workers(containers, tmp_path, client, case):
    """Each shard is a file of its own: a task writes its tensors into the shards that
    hold them, and the output is byte-identical to a local run's."""
    for folder in ("local", "spread"):
        (tmp_path / folder).mkdir()
    local = streamavg.average([containers / case], scheme="linear", output=tmp_path / "local")
    spread = streamavg.average(
        [containers / case], scheme="linear", output=tmp_path / "spread", client=client
    )
    assert tree(spread.output) == tree(local.output)


def test_an_output_the_workers_cannot_write_is_refused_in_one_line(tmp_path, client, capsys):
    for epoch in (1, 2):  # chunked, as h5py may write it but Keras never does
        with h5py.File(tmp_path / f"m_{epoch}.weights.h5", "w") as f:
            f.create_dataset(
                "layers/dense/vars/0", data=np.full((4, 4), epoch, "f4"), chunks=(2, 2)
            )
    out = tmp_path / "avg.weights.h5"
    assert main([str(tmp_path), "-o", str(out), "-q", "--scheduler", client.scheduler.address]) == 2
    assert capsys.readouterr().err == (
        "streamavg: error: the Dask fold cannot write this output: its tensors are not at "
        "fixed offsets in files (an Orbax checkpoint, or chunked HDF5 datasets)\n"
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    """Eight checkpoints of a 20-layer MLP (about 5 MB each), written by Keras's `fit`."""
    import keras

    folder = tmp_path_factory.mktemp("larger")
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(256, activation="relu") for _ in range(20)]
    model = keras.Sequential([keras.Input((64,)), *layers, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    save = keras.callbacks.ModelCheckpoint(
        folder / "model_{epoch}.weights.h5", save_weights_only=True
    )
    x = np.random.default_rng(0).normal(size=(64, 64)).astype("float32")
    model.fit(x, x[:, :1], epochs=8, verbose=0, callbacks=[save])
    return folder


def test_a_worker_killed_mid_run_is_replaced_and_the_bytes_are_unchanged(
    larger, tmp_path, client, monkeypatch
):
    local = streamavg.average([larger], output=tmp_path / "a.weights.h5")
    monkeypatch.setattr(cluster, "TASK_BYTES", 1)  # a task per tensor: 42 of them
    pids = client.run(os.getpid)
    result = {}
    run = threading.Thread(
        target=lambda: result.update(
            out=streamavg.average([larger], output=tmp_path / "b.weights.h5", client=client)
        )
    )
    run.start()
    victim = None
    while victim is None and run.is_alive():
        busy = [
            w
            for w, keys in client.processing().items()
            if any("streamavg-fold" in str(k) for k in keys)
        ]
        victim = busy[0] if busy else None
        time.sleep(0.005)
    assert victim is not None, "the run ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    run.join()
    assert result["out"].output.read_bytes() == local.output.read_bytes()
    client.wait_for_workers(2)
    assert victim not in client.scheduler_info()["workers"]  # a new worker took its place


def test_workers_read_inputs_in_s3_themselves(checkpoints, tmp_path, client, s3, monkeypatch):
    """Inputs and output in S3 (moto's server on loopback): the workers read the objects by
    byte ranges with their own credentials, and the output's bytes are a local run's."""
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    env = {k: os.environ[k] for k in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    client.run(lambda: os.environ.update(env))  # each worker's own credentials
    monkeypatch.setattr(cluster, "TASK_BYTES", 1)
    local = streamavg.average(
        [checkpoints / "k3-keras"], scheme="linear", output=tmp_path / "a.keras"
    )
    with get_task_stream(client) as tasks:
        streamavg.average([url], scheme="linear", output="s3://bkt/out/avg.keras", client=client)
    assert s3.cat("bkt/out/avg.keras") == local.output.read_bytes()
    assert {t["worker"] for t in tasks.data} == set(client.scheduler_info()["workers"])


def test_a_worker_that_cannot_reach_the_output_says_so_in_one_line(checkpoints, tmp_path):
    """What a task on a worker without the client's filesystem meets: no temporary file."""
    files = sorted(str(p) for p in (checkpoints / "k3-weights").iterdir())
    with ExitStack() as stack:
        tensors = to_average(open_all(files, stack))
    missing = str(tmp_path / "elsewhere" / "avg.weights.h5")
    with pytest.raises(StreamavgError) as e:
        cluster._fold_group(
            files,
            np.ones(len(files)),
            tensors,
            {t.name: (missing, 0) for t in tensors},
            False,
            False,
            False,
        )
    assert str(e.value) == (
        f"{missing}: a worker cannot write the output's temporary file (No such file or "
        "directory); the workers must share the output's filesystem"
    )
