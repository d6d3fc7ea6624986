"""The fold on a real Dask cluster: a scheduler and two worker processes on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CREDENTIALS, put_tree, tree
from distributed import Client, LocalCluster, get_task_stream

import streamavg
from streamavg import cluster, multipart
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
    assert all(k.startswith("streamavg-") for k in keys)
    assert len({k for k in keys if k.startswith("streamavg-fold-")}) > 2
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
        "streamavg: error: the Dask fold cannot write this output: its datasets are chunked "
        "(as h5py may write them, Keras never does), with no fixed place in the file for a "
        "worker to write\n"
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
            cluster.Fold(files, np.ones(len(files)), False, False),
            tensors,
            {t.name: (missing, 0) for t in tensors},
            False,
        )
    assert str(e.value) == (
        f"{missing}: a worker cannot write the output's temporary file (No such file or "
        "directory); the workers must share the client's filesystem for local paths"
    )


def test_a_scheduler_that_cannot_be_reached_is_one_line(checkpoints, tmp_path, capsys):
    import socket

    import dask

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "avg.weights.h5"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = main([str(checkpoints / "k3-weights"), "-o", str(out), "-q", "--scheduler", address])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith(f"streamavg: error: {address}: cannot reach the Dask scheduler (")
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def apart(tmp_path_factory, endpoint):
    """A scheduler and two workers on loopback that share nothing with the client but the
    store: each worker runs in a mount namespace of its own, with an empty tmpfs over the
    client's temporary directory (its checkpoints, outputs and working directory)."""
    hidden = tmp_path_factory.getbasetemp()
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, check=False).returncode:
        pytest.skip("workers apart need `unshare --mount` (root, or a user namespace)")
    spool = Path(tempfile.mkdtemp(prefix="streamavg-dask-"))  # the scheduler's address
    dask = [sys.executable, "-m", "dask"]
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    address = ["--scheduler-file", str(spool / "scheduler.json")]
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    hide += ['mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden)]
    worker = [*dask, "worker", *address, *loopback, "--nthreads", "1"]
    procs = [subprocess.Popen([*dask, "scheduler", *address, *loopback, "--port", "0"], **quiet)]
    procs += [subprocess.Popen([*hide, *worker], cwd="/", **quiet) for _ in range(2)]
    try:
        for _ in range(600):
            if (spool / "scheduler.json").exists():
                break
            time.sleep(0.05)
        with Client(scheduler_file=str(spool / "scheduler.json")) as c:
            c.wait_for_workers(2, timeout=60)
            yield c
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        shutil.rmtree(spool)


def test_workers_apart_cannot_see_the_clients_files(apart, tmp_path):
    """The positive control: a file the client wrote is there for it, not for a worker."""
    probe = tmp_path / "probe"
    probe.write_text("written by the client")
    assert apart.run(os.path.exists, str(probe)) == dict.fromkeys(
        apart.scheduler_info()["workers"], False
    )
    assert apart.run(os.path.exists, sys.executable) == dict.fromkeys(
        apart.scheduler_info()["workers"], True
    )


def test_local_paths_workers_cannot_see_are_one_line(apart, checkpoints, tmp_path, monkeypatch):
    """Relative paths are made absolute on the client, then checked once on a worker."""
    shutil.copytree(checkpoints / "k3-weights", tmp_path / "ckpts")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StreamavgError) as e:
        streamavg.average(["ckpts"], output="avg.weights.h5", client=apart)
    first = tmp_path / streamavg.plan(["ckpts"]).files[0]
    assert str(e.value) == (
        f"{first}: a worker cannot see this input; the workers must share the client's "
        "filesystem for local paths"
    )
    assert not (tmp_path / "avg.weights.h5").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Checkpoints of about 25 MB each, three S3 parts of MIN_PART or more: `.keras` and
    `.weights.h5` from a Keras `fit` (six Dense 1024 -> 1024 layers), and safetensors."""
    import keras
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("wide")
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(1024) for _ in range(6)]
    model = keras.Sequential([keras.Input((1024,)), *layers])
    model.compile("sgd", "mse")
    saves = [
        keras.callbacks.ModelCheckpoint(root / "keras" / "model_{epoch}.keras"),
        keras.callbacks.ModelCheckpoint(
            root / "weights" / "model_{epoch}.weights.h5", save_weights_only=True
        ),
    ]
    x = np.random.default_rng(0).normal(size=(8, 1024)).astype("float32")
    model.fit(x, x, epochs=3, verbose=0, callbacks=saves)
    (root / "safetensors").mkdir()
    rng = np.random.default_rng(1)
    for step in (10, 20, 30):
        arrays = {f"w{k}": rng.standard_normal((1024, 1024), np.float32) for k in range(6)}
        save_file(arrays, root / "safetensors" / f"step_{step}.safetensors")
    return root


STORE_CASES = {  # the inputs (a fixture, a folder in it) and the output's name
    "keras": ("checkpoints", "k3-keras", "avg.keras"),
    "weights-h5": ("checkpoints", "k3-weights", "avg.weights.h5"),
    "keras-sharded": ("containers", "keras-sharded", "avg.weights.json"),
    "keras-dir": ("containers", "keras-dir", "avg"),
    "safetensors": ("containers", "safetensors", "avg.safetensors"),
    "safetensors-dir": ("containers", "safetensors-dir", "avg"),
    "wide-keras": ("wide", "keras", "avg.keras"),
    "wide-weights-h5": ("wide", "weights", "avg.weights.h5"),
    "wide-safetensors": ("wide", "safetensors", "avg.safetensors"),
}


def objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the store, by name below it."""
    return {key[len(prefix) + 1 :]: s3.cat(key) for key in sorted(s3.find(prefix))}


def unfinished(s3) -> list:
    """The bucket's multipart uploads that were neither completed nor aborted."""
    return s3.call_s3("list_multipart_uploads", Bucket="bkt").get("Uploads", [])


@pytest.mark.parametrize("case", STORE_CASES)
def test_workers_apart_write_the_output_in_s3_as_a_local_run_would(
    apart, s3, request, tmp_path, monkeypatch, case
):
    """Inputs and output in S3, workers that cannot see the client's files: each task
    sends the parts it computed; the objects are a local run's bytes, and nothing else
    is left in the bucket, not even an unfinished upload."""
    fixture, folder, name = STORE_CASES[case]
    inputs = request.getfixturevalue(fixture) / folder
    url = put_tree(s3, inputs, "bkt/run")
    monkeypatch.setattr(multipart, "PART_BYTES", multipart.MIN_PART)  # several parts
    monkeypatch.setattr(cluster, "TASK_BYTES", 1)  # a task per run of parts
    local = streamavg.average([inputs], scheme="linear", output=tmp_path / "local" / name)
    with get_task_stream(apart) as tasks:
        streamavg.average([url], scheme="linear", output=f"s3://bkt/out/{name}", client=apart)
    prefix = "bkt/out" + (f"/{name}" if local.output.is_dir() else "")
    assert objects(s3, prefix) == tree(local.output)
    assert sorted(s3.find("bkt")) == sorted(
        [*s3.find("bkt/run"), *(f"{prefix}/{k}" for k in tree(local.output))]
    )
    assert unfinished(s3) == []
    keys = {str(t["key"]) for t in tasks.data if str(t["key"]).startswith("streamavg-fold-")}
    assert keys and all(str(t["key"]).startswith("streamavg-") for t in tasks.data)
    assert {t["worker"] for t in tasks.data} <= set(apart.scheduler_info()["workers"])
    if fixture == "wide":  # more than a part, sent by more than one task
        assert len(keys) > 1
        assert int(s3.info(f"bkt/out/{name}")["ETag"].strip('"').split("-")[1]) >= 3


def test_a_failing_run_leaves_nothing_in_the_store(apart, s3, checkpoints, tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(checkpoints / "k3-weights", ckpts)
    with h5py.File(ckpts / "model_3.weights.h5", "a") as f:
        f["layers/dense/vars/1"][0] = np.nan
    url = put_tree(s3, ckpts, "bkt/run")
    argv = [url, "-o", "s3://bkt/out/avg.weights.h5", "-q", "--scheduler", apart.scheduler.address]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {url}/model_3.weights.h5: layers/dense/vars/1: contains NaN or Inf "
        "(pass --allow-nonfinite to average anyway)\n"
    )
    assert not s3.exists("bkt/out") and unfinished(s3) == []


def test_a_worker_apart_killed_mid_run_leaves_the_right_object(
    apart, s3, wide, tmp_path, monkeypatch
):
    """The worker's nanny starts another; its tasks run again and send their parts again."""
    url = put_tree(s3, wide / "weights", "bkt/run")
    monkeypatch.setattr(multipart, "PART_BYTES", multipart.MIN_PART)
    monkeypatch.setattr(cluster, "TASK_BYTES", 1)
    local = streamavg.average([wide / "weights"], output=tmp_path / "a.weights.h5")
    pids = apart.run(os.getpid)
    result = {}
    run = threading.Thread(
        target=lambda: result.update(
            out=streamavg.average([url], output="s3://bkt/out/a.weights.h5", client=apart)
        )
    )
    run.start()
    victim = None
    while victim is None and run.is_alive():
        busy = [w for w, keys in apart.processing().items() if keys]
        victim = busy[0] if busy else None
        time.sleep(0.005)
    assert victim is not None, "the run ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    run.join()
    assert s3.cat("bkt/out/a.weights.h5") == local.output.read_bytes()
    assert unfinished(s3) == []
    apart.wait_for_workers(2)
