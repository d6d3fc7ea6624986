"""Outputs in object storage: a real S3 server (moto's) on the loopback interface."""

# ruff: noqa: E501

from __future__ import annotations

import socket

import pytest
import s3fs
from moto.server import ThreadedMotoServer

import streamavg
from streamavg.cli import main

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint, monkeypatch):
    """An empty bucket `bkt` on the server, and the environment that reaches it."""
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("bkt"):
        fs.rm("bkt", recursive=True)
    fs.mkdir("bkt")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


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
