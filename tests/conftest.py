"""Real checkpoints, written once per test session by Keras 3 and tf_keras (Keras 2)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from make_checkpoints import KERAS2, KERAS3

HERE = Path(__file__).parent
CASES = sorted([*KERAS3, *KERAS2])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding one sub-directory of checkpoints per case (read-only by convention)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for which in ("keras3", "keras2"):
        subprocess.run(
            [sys.executable, str(HERE / "make_checkpoints.py"), str(root), which],
            check=True,
            capture_output=True,
        )
    return root


@pytest.fixture
def case_copy(checkpoints: Path, tmp_path: Path):
    """A private copy of one case's checkpoints, for tests that write next to them."""

    def copy(case: str) -> Path:
        return Path(shutil.copytree(checkpoints / case, tmp_path / case))

    return copy


def files(directory: Path) -> list[Path]:
    """Checkpoints of a case directory, chronological (numbered with equal widths)."""
    return sorted(p for p in directory.iterdir() if p.is_file())


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) with a digest of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def floating(dtype: np.dtype) -> bool:
    """Whether `dtype` holds floats: numpy's own, or ml_dtypes' (bfloat16's kind is "V")."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


def correctly_rounded(stack: np.ndarray, weights: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """The weighted mean of `stack` (one row per checkpoint) with integer `weights`, in exact
    rational arithmetic, rounded once to `dtype`: to nearest, ties to even."""
    bits = np.dtype(f"u{dtype.itemsize}")
    rows = [[Fraction(float(v)) for v in row.reshape(-1)] for row in stack.astype(np.float64)]
    total = sum(weights)
    out = []
    for column in zip(*rows, strict=True):
        exact = sum((w * v for w, v in zip(weights, column, strict=True)), Fraction(0)) / total
        guess = np.array([float(exact)]).astype(dtype).view(bits)[0].item()
        limit = np.iinfo(bits).max
        near = [
            np.array([g], bits).view(dtype)
            for g in (guess - 1, guess, guess + 1)
            if 0 <= g <= limit
        ]
        near = [(x, int(x.view(bits)[0])) for x in near if np.isfinite(x.astype(np.float64))[0]]
        # nearest, ties to even: an even significand ends in a 0 bit
        best = min(near, key=lambda c: (abs(Fraction(float(c[0][0])) - exact), c[1] & 1))
        out.append(best[1])
    return np.array(out, bits).view(dtype).reshape(stack.shape[1:])


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in units in the last place between two float arrays of one dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = np.dtype(f"i{a.dtype.itemsize}")

    def ordered(x: np.ndarray) -> np.ndarray:
        i = x.view(ints).astype(np.int64)
        return np.where(i < 0, np.iinfo(ints).min - i, i)

    return int(np.abs(ordered(a) - ordered(b)).max(initial=0))


def temporary(directory: Path) -> list[Path]:
    """The temporary outputs of runs in `directory`: `.NAME.streamavg-XXXXXXXX.KIND`."""
    return sorted(directory.glob(".*.streamavg-*"))


def wait_for_temporary(directory: Path, proc: subprocess.Popen) -> Path:
    """The run's temporary output, as soon as it exists: the run is then writing."""
    while not temporary(directory):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.002)
    return temporary(directory)[0]


def killed_while_writing(directory: Path, *args: object) -> tuple[int, Path]:
    """Run `python -m streamavg ARGS --quiet`, whose output goes into `directory`, and
    SIGKILL it as soon as it writes there; its process id and its temporary output."""
    cmd = [sys.executable, "-m", "streamavg", *map(str, args), "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    temp = wait_for_temporary(directory, proc)
    proc.kill()
    proc.wait()
    return proc.pid, temp


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (moto's), on the loopback interface for the whole session; its
    request recorder (see test_remote) writes in a temporary folder."""
    recording = tmp_path_factory.mktemp("moto") / "recording"
    os.environ.setdefault("MOTO_RECORDER_FILEPATH", str(recording))
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """An empty bucket `bkt` on the server, and the environment that reaches it."""
    import s3fs

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("bkt"):
        fs.rm("bkt", recursive=True)
    fs.mkdir("bkt")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def put_tree(fs, local: Path, key: str) -> str:
    """Upload every file under folder `local` to `key/` in the store; its URL."""
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{key}/{f.relative_to(local).as_posix()}")
    return f"s3://{key}"


@pytest.fixture(scope="session")
def containers(tmp_path_factory) -> Path:
    """Keras sharded weights and unzipped `.keras` folders (one run, three epochs), and
    safetensors files and sharded folders, each kind in its own folder."""
    import ml_dtypes
    from safetensors.numpy import save_file
    from training import FIT, X, Y, make_model

    root = tmp_path_factory.mktemp("containers")
    model = make_model(batchnorm=True)
    (root / "keras-sharded").mkdir()
    for e in range(1, 4):
        model.fit(X, Y, epochs=1, **FIT)
        model.save_weights(
            root / "keras-sharded" / f"epoch_{e}.weights.json", max_shard_size=1.4e-7
        )
        model.save(str(root / "keras-dir" / f"epoch_{e}"), zipped=False)
    rng = np.random.default_rng(0)
    for step in (100, 200, 300):
        arrays = {
            "w": rng.standard_normal((64, 96)).astype(np.float32),
            "b": rng.standard_normal(96).astype(ml_dtypes.bfloat16),
        }
        (root / "safetensors").mkdir(exist_ok=True)
        save_file(arrays, root / "safetensors" / f"step_{step}.safetensors")
        folder = root / "safetensors-dir" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": arrays["w"]}, folder / "model-00001-of-00002.safetensors")
        save_file({"b": arrays["b"]}, folder / "model-00002-of-00002.safetensors")
        index = {
            "metadata": {},
            "weight_map": {
                "w": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def tree(path: Path) -> dict[str, bytes]:
    """Every file of an output (a file, a folder, or a manifest with its shards) by name."""
    if path.is_dir():
        return {
            str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
        }
    return {f.name: f.read_bytes() for f in sorted(path.parent.iterdir())}
