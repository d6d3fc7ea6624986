"""Fuzz the averaging path with seeded mutations of real Keras checkpoints, driven by hypothesis.

Each case copies one directory of real checkpoints, damages one file (flipped bytes, a
truncation, a zeroed or repeated range, anywhere: metadata or data), runs the command line
in this process and requires one of two outcomes:
  - success, with every output tensor equal to np.average over what h5py reads from the
    damaged bytes (a `.keras` archive's weights member read at its offset, unchecked), or
  - exit 1 and one line on stderr that names the damaged file, and no output.
A traceback fails the case; a crash or a hang kills this process, which the test running it
reports. It prints a tally of outcomes and exits 1 on the first failure.

    .venv/bin/python scripts/fuzz.py --cases 3000                 # writes its own checkpoints
    .venv/bin/python scripts/fuzz.py --checkpoints DIR --cases 300 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from streamavg import scheme_weights
from streamavg.casts import named_dtype
from streamavg.cli import main as streamavg
from streamavg.formats.hdf5 import logical_name
from streamavg.formats.keras_zip import WEIGHTS_MEMBER

CASES = ("k3-keras", "k3-weights", "k3-h5", "k3-keras-bf16", "k2-h5", "k2-weights")
SKIPPED_GROUPS = ("optimizer", "optimizer_weights")  # not the model part in any format


def mutate(data: bytes, draw) -> bytes:
    """One damage to `data`: flipped bytes, a cut, a zeroed range or a repeated range."""
    size = len(data)
    kind = draw(st.sampled_from(["flip", "truncate", "zero", "repeat"]))
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, size - 1))
            out[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del out[draw(st.integers(0, size - 1)) :]
    else:
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, 4096))
        end = min(size, start + length)
        if kind == "zero":
            out[start:end] = bytes(end - start)
        else:
            out[end:end] = out[start:end]
    return bytes(out)


def hdf5_image(path: Path) -> io.BytesIO | Path:
    """The HDF5 bytes of a checkpoint: the file, or a .keras member read at its offset."""
    raw = path.read_bytes()
    if not raw.startswith(b"PK"):
        return path
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(WEIGHTS_MEMBER)
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    return io.BytesIO(raw[start : start + info.file_size])


def model_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every dataset outside the optimizer groups, as h5py reads it, in logical dtypes."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(hdf5_image(path), "r") as f:
        model = "model_weights" if "model_weights" in f else None
        names: list[str] = []
        f.visit(names.append)  # names only: objects outside the model part stay unopened
        for name in names:  # bytes where a damaged name is not UTF-8
            text = name if isinstance(name, str) else name.decode("utf-8", "replace")
            root = text.split("/", 1)[0]
            if root in SKIPPED_GROUPS or (model and root != model):
                continue
            obj = f[name]
            if isinstance(obj, h5py.Dataset):
                found[text] = np.asarray(obj[()]).view(named_dtype(logical_name(obj.dtype)))
    return found


def reference(paths: list[Path], weights: np.ndarray) -> dict[str, np.ndarray]:
    """np.average in float64 of every float tensor; other tensors from the newest file."""
    inputs = [model_tensors(p) for p in paths]
    out = {}
    for name, newest in inputs[-1].items():
        if newest.dtype.kind in "fV":
            stack = np.array([x[name] for x in inputs]).astype(np.float64)
            out[name] = np.average(stack, axis=0, weights=weights).astype(newest.dtype)
        else:
            out[name] = newest
    return out


def check(directory: Path, victim: Path, work: Path) -> str:
    """Run the CLI on `directory` and judge the outcome; return its name, raise on failure."""
    out = work / f"avg{''.join(victim.suffixes)}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = streamavg([str(directory), "-o", str(out), "--quiet", "--scheme", "linear"])
    message = err.getvalue()
    if code != 0:
        assert code == 1, f"exit {code}: {message}"
        assert message.count("\n") == 1 and message.startswith("streamavg: error: "), message
        assert str(victim) in message, f"does not name {victim}: {message}"
        assert not out.exists() and not list(work.iterdir()), "left files behind"
        return "refused"
    paths = sorted(p for p in directory.iterdir() if p.is_file())
    want = reference(paths, scheme_weights("linear", len(paths)))
    got = model_tensors(out)
    assert sorted(got) == sorted(want), f"tensors differ: {sorted(got)} vs {sorted(want)}"
    for name, value in want.items():
        same = np.array_equal(
            got[name].reshape(-1).view(np.uint8), value.reshape(-1).view(np.uint8)
        )
        assert same, f"{victim}: {name} differs from what its bytes imply"
    out.unlink()
    return "accepted"


def run(checkpoints: Path, cases: int, seed_value: int) -> collections.Counter:
    """Run `cases` hypothesis examples; raise on the first failure."""
    tally: collections.Counter = collections.Counter()
    scratch = Path(tempfile.mkdtemp(prefix="streamavg-fuzz-"))

    @seed(seed_value)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=st.sampled_from(CASES), data=st.data())
    def one(case: str, data) -> None:
        directory = scratch / "ckpts"
        work = scratch / "out"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(checkpoints / case, directory)
        work.mkdir(parents=True)
        paths = sorted(directory.iterdir())
        victim = paths[data.draw(st.integers(0, len(paths) - 1))]
        victim.write_bytes(mutate(victim.read_bytes(), data.draw))
        tally[check(directory, victim, work)] += 1

    try:
        one()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoints", type=Path, help="a directory from tests/make_checkpoints.py"
    )
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamavg-ckpts-") as made:
        checkpoints = args.checkpoints
        if checkpoints is None:
            checkpoints = Path(made)
            script = Path(__file__).resolve().parents[1] / "tests" / "make_checkpoints.py"
            for which in ("keras3", "keras2"):
                subprocess.run([sys.executable, str(script), made, which], check=True)
        tally = run(checkpoints, args.cases, args.seed)
    print(f"fuzz: {sum(tally.values())} cases, " + ", ".join(f"{v} {k}" for k, v in tally.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
