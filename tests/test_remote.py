"""Outputs in object storage: a real S3 server (moto's) on the loopback interface."""

# ruff: noqa: E501

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest
import s3fs
from conftest import put_tree, tree

import streamavg
from streamavg.cli import main
from streamavg.engine import fold, open_all, to_average
from streamavg.errors import StreamavgError
from streamavg.select import select_checkpoints


@pytest.mark.parametrize(
    "case, name", [("k3-keras", "avg.keras"), ("k3-weights", "avg.weights.h5")]
)
def test_an_output_in_s3_has_the_bytes_of_a_local_one(checkpoints, tmp_path, s3, case, name):
    local = streamavg.average([checkpoints / case], scheme="linear", output=tmp_path / name)
    result = streamavg.average([checkpoints / case], scheme="linear", output=f"s3://bkt/run/{name}")
    assert result.output == f"s3://bkt/run/{name}"
    assert s3.cat(f"bkt/run/{name}") == local.output.read_bytes()
    assert s3.ls("bkt/run") == [f"bkt/run/{name}"]  # nothing else left there


def test_a_folder_url_takes_the_default_name(checkpoints, s3, capsys):
    assert main([str(checkpoints / "k3-weights"), "-o", "s3://bkt/avg/", "-q"]) == 0
    (name,) = [p.rsplit("/", 1)[1] for p in s3.ls("bkt/avg")]
    assert name == "model_5.avg-equal-n5.weights.h5"
    assert capsys.readouterr().out.startswith(f"averaged 5 files (equal) into s3://bkt/avg/{name} ")


def test_an_existing_object_is_kept_without_overwrite(checkpoints, s3, capsys):
    s3.pipe("bkt/avg.keras", b"old")
    assert main([str(checkpoints / "k3-keras"), "-o", "s3://bkt/avg.keras", "-q"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "streamavg: error: s3://bkt/avg.keras: already exists (pass --overwrite to replace it)\n"
    )
    assert s3.cat("bkt/avg.keras") == b"old"
    assert (
        main([str(checkpoints / "k3-keras"), "-o", "s3://bkt/avg.keras", "-q", "--overwrite"]) == 0
    )
    assert s3.cat("bkt/avg.keras")[:2] == b"PK"


@pytest.mark.parametrize(
    "setup, message",
    [
        ("no-bucket", "s3://nobucket/avg.keras: no such bucket or folder"),
        ("no-credentials", "s3://bkt/avg.keras: no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or fsspec's config)"),
    ],
)  # fmt: skip
def test_an_unreachable_destination_is_refused_in_one_line(
    checkpoints, s3, monkeypatch, capsys, setup, message
):
    url = "s3://nobucket/avg.keras" if setup == "no-bucket" else "s3://bkt/avg.keras"
    if setup == "no-credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        s3fs.S3FileSystem.clear_instance_cache()
    assert main([str(checkpoints / "k3-keras"), "-o", url, "-q"]) == 1
    assert capsys.readouterr().err == f"streamavg: error: {message}\n"


def test_a_post_hoc_ema_goes_to_s3_too(tmp_path, s3):
    from training import FIT, X, Y, make_model

    from streamavg.callbacks import PostHocEMA

    make_model().fit(X, Y, epochs=4, callbacks=[PostHocEMA(tmp_path, every_steps=8)], **FIT)
    local = streamavg.phema(tmp_path, 0.07, output=tmp_path / "out" / "ema.weights.h5")
    assert main(["phema", str(tmp_path), "--sigma-rel", "0.07", "-o", "s3://bkt/emas/", "-q"]) == 0
    assert s3.cat("bkt/emas/ema-0.07-000000032.weights.h5") == local.output.read_bytes()


# Inputs in the store: read by byte ranges, the same bytes as a local run.


def recorded(endpoint: str) -> list[dict]:
    """The requests moto's server recorded since `record` (its own recorder, server side)."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording") as r:
        return [json.loads(line) for line in r.read().decode().splitlines() if line]


def record(endpoint: str) -> None:
    for action in ("reset-recording", "start-recording"):
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST")
        )


def gets(endpoint: str, prefix: str) -> list[tuple[str, str | None]]:
    """(key, Range header) of every GET of an object under `prefix` since `record`."""
    found = []
    for r in recorded(endpoint):
        path = urllib.parse.urlsplit(r["url"]).path
        if r["method"] == "GET" and path.startswith(f"/bkt/{prefix}/"):
            found.append((path, r["headers"].get("Range")))
    return found


KERAS_CASES = ["k3-keras", "k3-keras-bf16", "k3-weights", "k3-h5", "k2-h5", "k2-weights"]
OTHER_CASES = ["keras-sharded", "keras-dir", "safetensors", "safetensors-dir"]


@pytest.mark.parametrize("case", KERAS_CASES + OTHER_CASES)
def test_inputs_in_s3_average_to_the_bytes_of_a_local_run(
    checkpoints, containers, tmp_path, s3, endpoint, case
):
    local = (checkpoints if case in KERAS_CASES else containers) / case
    url = put_tree(s3, local, "bkt/run")
    for folder in ("local", "remote"):
        (tmp_path / folder).mkdir()
    want = streamavg.average([local], scheme="linear", output=tmp_path / "local")
    record(endpoint)
    got = streamavg.average([url], scheme="linear", output=tmp_path / "remote")
    assert [str(f) for f in got.files] == [
        f"{url}/{f.relative_to(local).as_posix()}" for f in want.files
    ]
    assert got.output.name == want.output.name
    assert tree(got.output) == tree(want.output)
    weights = [
        r for key, r in gets(endpoint, "run") if key.endswith((".h5", ".keras", ".safetensors"))
    ]
    assert weights and None not in weights  # byte ranges, never a whole file (JSON is read whole)


def test_a_big_checkpoint_is_read_once_by_ranges_not_downloaded(tmp_path, s3, endpoint):
    """Three .keras files of 4 MiB of weights: every byte fetched about once, by ranges,
    and each kernel's blocks (512 KiB pieces of the fold) merged into one request."""
    import keras

    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(1024, name="big")])
    rng = np.random.default_rng(1)
    (tmp_path / "run").mkdir()
    for e in range(1, 4):
        model.set_weights(
            [rng.standard_normal(w.shape).astype("float32") for w in model.get_weights()]
        )
        model.save(tmp_path / "run" / f"model_{e}.keras")
    url = put_tree(s3, tmp_path / "run", "bkt/big")
    record(endpoint)
    got = streamavg.average([url], scheme="exp", output=tmp_path / "avg.keras")
    want = streamavg.average([tmp_path / "run"], scheme="exp", output=tmp_path / "local.keras")
    assert got.output.read_bytes() == want.output.read_bytes()
    ranges = [r for _, r in gets(endpoint, "big")]
    assert None not in ranges
    sizes = [int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in ranges)]
    fetched = sum(sizes)
    stored = sum(f.stat().st_size for f in (tmp_path / "run").iterdir())
    assert stored <= fetched < 1.1 * stored
    assert len([n for n in sizes if n > 1 << 20]) == 3  # each kernel in one request, merged


def test_selection_in_a_bucket_is_the_local_selection(checkpoints, tmp_path, s3, capsys):
    """An earlier output in averaged/, best.keras beside the epochs, a name without a number:
    left out, with the same notes; --last and --epochs choose as they do locally."""
    local = tmp_path / "run"
    shutil.copytree(checkpoints / "k3-keras", local)
    shutil.copy(local / "model_5.keras", local / "best.keras")
    assert main([str(local), "-q"]) == 0  # local/averaged/model_5.avg-equal-n5.keras
    shutil.copy(
        local / "averaged" / "model_5.avg-equal-n5.keras", local / "model_5.avg-equal-n5.keras"
    )
    url = put_tree(s3, local, "bkt/run")
    for options in ({}, {"last": 2}, {"epochs": "2:3"}, {"pattern": "model_[34].keras"}):
        here = select_checkpoints([local], **options)
        there = select_checkpoints([url], **options)
        assert [str(p) for p in there.paths] == [
            str(p).replace(str(local), url) for p in here.paths
        ]
        assert there.notes == tuple(n.replace(str(local), url) for n in here.notes)
    assert select_checkpoints([url]).notes == (
        f"left out {url}/model_5.avg-equal-n5.keras: an earlier streamavg output",
        f"left out {url}/best.keras: no epoch number in the name, unlike the other checkpoints",
    )


def test_the_default_output_goes_beside_inputs_in_the_store(checkpoints, s3, capsys):
    url = put_tree(s3, checkpoints / "k3-weights", "bkt/run")
    assert main([url, "-q"]) == 0
    assert s3.ls("bkt/run/averaged") == ["bkt/run/averaged/model_5.avg-equal-n5.weights.h5"]
    assert main([url, "-q"]) == 2  # the output is left out of the scan, and not replaced
    assert capsys.readouterr().err == (
        f"streamavg: error: {url}/averaged/model_5.avg-equal-n5.weights.h5: already exists "
        "(pass --overwrite to replace it)\n"
    )


def test_an_object_rewritten_during_the_run_is_refused(checkpoints, s3, tmp_path):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    files = streamavg.plan([url]).files
    with ExitStack() as stack:
        opened = open_all(files, stack)
        s3.pipe("bkt/run/model_2.keras", (checkpoints / "k3-keras" / "model_3.keras").read_bytes())
        with pytest.raises(StreamavgError) as e:
            fold(opened, np.full(5, 0.2), to_average(opened), lambda *a: None)
    assert (
        str(e.value)
        == f"{url}/model_2.keras: changed while being averaged (rewritten in the store)"
    )


@pytest.mark.parametrize(
    "given, message",
    [
        ("s3://bkt/nothing", "s3://bkt/nothing: no such file or directory"),
        ("s3://bkt/run/model_9.keras", "s3://bkt/run/model_9.keras: no such file or directory"),
        ("https://example.com/run", "https://example.com/run: HTTP cannot list folders; use object storage (s3://, gs://, ...)"),
    ],
)  # fmt: skip
def test_missing_inputs_are_refused_in_one_line(checkpoints, s3, capsys, given, message):
    put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    assert main([given, "-q"]) in (1, 2)
    assert capsys.readouterr().err == f"streamavg: error: {message}\n"


def test_inputs_without_credentials_are_refused_in_one_line(checkpoints, s3, monkeypatch, capsys):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    assert main([url, "-q"]) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {url}: no credentials "
        "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or fsspec's config)\n"
    )


def test_checkpoints_in_folders_by_epoch_are_found_one_level_down(checkpoints, tmp_path, s3):
    for e in range(1, 6):
        (tmp_path / f"epoch_{e}").mkdir()
        shutil.copy(checkpoints / "k3-weights" / f"model_{e}.weights.h5", tmp_path / f"epoch_{e}")
    url = put_tree(s3, tmp_path, "bkt/run")
    there = select_checkpoints([url])
    assert [str(p) for p in there.paths] == [
        f"{url}/epoch_{e}/model_{e}.weights.h5" for e in range(1, 6)
    ]
    result = streamavg.average([url], scheme="linear")
    assert result.output == f"{url}/averaged/epoch_5_model_5.avg-linear-n5.weights.h5"
    local = streamavg.average([tmp_path], scheme="linear")
    assert s3.cat(result.output.removeprefix("s3://")) == local.output.read_bytes()


@pytest.mark.parametrize("case", ["keras-sharded", "keras-dir", "safetensors-dir"])
def test_outputs_of_several_files_are_uploaded_file_by_file(containers, tmp_path, s3, case):
    name = "avg.weights.json" if case == "keras-sharded" else "avg"  # shards, or a folder
    local = streamavg.average([containers / case], output=tmp_path / name)
    streamavg.average([containers / case], output=f"s3://bkt/out/{name}")
    prefix = "bkt/out/" if case == "keras-sharded" else "bkt/out/avg/"
    assert {k.removeprefix(prefix): s3.cat(k) for k in s3.find("bkt/out")} == tree(local.output)


def test_local_and_remote_inputs_together_are_refused(checkpoints, s3, capsys):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    assert main([str(checkpoints / "k2-h5"), url, "-q"]) == 2
    assert capsys.readouterr().err == (
        f"streamavg: error: {checkpoints / 'k2-h5' / 'model_01.h5'} and {url}/model_1.keras: "
        "average checkpoints from one place, local or remote\n"
    )


@contextmanager
def allowed(endpoint: str, monkeypatch: pytest.MonkeyPatch, *actions: str) -> Iterator[None]:
    """Credentials that may list and read `bkt` but not write to it: an IAM user of the
    server, with its policy enforced (moto's auth switched on for this test)."""
    import boto3

    iam = boto3.client("iam")
    if "s3:ListBucket" in actions:  # moto >= 5.2.6 authorizes ListObjectsV2 as its own action
        actions = (*actions, "s3:ListObjectsV2")  # (AWS checks s3:ListBucket alone)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": list(actions),
                "Resource": ["arn:aws:s3:::bkt", "arn:aws:s3:::bkt/*"],
            }
        ],
    }
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]

    def auth(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            count.encode(),
            {"Content-Type": "text/plain"},  # a form's body would be parsed away
            method="POST",
        )
        urllib.request.urlopen(request)

    with monkeypatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        env.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        s3fs.S3FileSystem.clear_instance_cache()
        auth("0")
        try:
            yield
        finally:
            auth("inf")
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("iam").delete_access_key(UserName="reader", AccessKeyId=key["AccessKeyId"])
    iam.delete_user_policy(UserName="reader", PolicyName="read")
    iam.delete_user(UserName="reader")


def test_a_failing_upload_leaves_nothing_behind(
    checkpoints, tmp_path, s3, endpoint, monkeypatch, capsys
):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local copy is written
    with allowed(endpoint, monkeypatch, "s3:GetObject", "s3:ListBucket"):
        assert main([url, "-o", "s3://bkt/out/avg.keras", "-q"]) == 1
    assert capsys.readouterr().err == "streamavg: error: s3://bkt/out/avg.keras: access denied\n"
    assert list(tmp_path.iterdir()) == []  # the local copy is gone too
    assert sorted(s3.find("bkt")) == [f"bkt/run/model_{e}.keras" for e in range(1, 6)]


def test_inputs_that_may_not_be_read_are_refused_in_one_line(
    checkpoints, tmp_path, s3, endpoint, monkeypatch, capsys
):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    with allowed(endpoint, monkeypatch, "s3:ListBucket"):
        assert main([url, "-o", str(tmp_path / "avg.keras"), "-q"]) == 1
    assert capsys.readouterr().err == f"streamavg: error: {url}/model_5.keras: access denied\n"
    assert list(tmp_path.iterdir()) == []


def test_inspect_reads_an_object_as_a_file(checkpoints, s3, capsys):
    local = checkpoints / "k3-keras" / "model_5.keras"
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run") + "/model_5.keras"
    assert main(["inspect", str(local)]) == 0
    here = capsys.readouterr().out
    assert main(["inspect", url]) == 0
    assert capsys.readouterr().out == here.replace(str(local), url)


@pytest.mark.parametrize(
    "missing, argv, message",
    [
        ("upath", ["s3://bkt/run"], "s3://bkt/run: remote storage needs the [remote] extra: pip install 'streamavg[remote]'"),
        ("fsspec", ["{ckpts}", "-o", "s3://bkt/avg.keras"], "s3://bkt/avg.keras: remote storage needs the [remote] extra: pip install 'streamavg[remote]'"),
        ("distributed", ["{ckpts}", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs Dask: pip install 'streamavg[dask]'"),
    ],
)  # fmt: skip
def test_a_feature_without_its_extra_names_the_extra(
    checkpoints, monkeypatch, capsys, missing, argv, message
):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it fails
    argv = [a.format(ckpts=checkpoints / "k3-keras") for a in argv]
    assert main([*argv, "-q"]) == 2
    assert capsys.readouterr().err == f"streamavg: error: {message}\n"


def test_an_input_object_is_never_the_output(checkpoints, s3, capsys):
    url = put_tree(s3, checkpoints / "k3-keras", "bkt/run")
    before = s3.cat("bkt/run/model_5.keras")
    assert main([url, "-o", f"{url}/model_5.keras", "--overwrite", "-q"]) == 2
    assert capsys.readouterr().err == (
        f"streamavg: error: {url}/model_5.keras: output is one of the inputs\n"
    )
    assert s3.cat("bkt/run/model_5.keras") == before


def test_metric_first_names_in_a_bucket_are_ordered_by_epoch(checkpoints, tmp_path, s3):
    """ModelCheckpoint's `model-{val_loss:.2f}-{epoch:02d}.keras`: 0.53 is never an epoch,
    in a bucket as on disk (the names' readings are taken below their common folder)."""
    losses = {1: "0.91", 2: "0.53", 3: "0.61", 4: "0.47", 5: "0.50"}
    (tmp_path / "run").mkdir()
    for e, loss in losses.items():
        shutil.copy(
            checkpoints / "k3-keras" / f"model_{e}.keras",
            tmp_path / "run" / f"model-{loss}-{e:02d}.keras",
        )
    url = put_tree(s3, tmp_path / "run", "bkt/run")
    there = select_checkpoints([url], last=3)
    assert [p.name for p in there.paths] == [
        "model-0.61-03.keras",
        "model-0.47-04.keras",
        "model-0.50-05.keras",
    ]
    assert [p.name for p in there.paths] == [
        p.name for p in select_checkpoints([tmp_path / "run"], last=3).paths
    ]
