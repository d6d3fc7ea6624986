"""A .keras output is a valid zip whose weights member is the HDF5 file written in place."""

from __future__ import annotations

import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
from conftest import files
from hypothesis import given
from hypothesis import strategies as st

import streamavg
from streamavg.formats import keras_zip
from streamavg.formats.keras_zip import WEIGHTS_MEMBER

ASSET = 64 << 20  # bytes of data in the large asset
PEAK = """
import atexit, re, runpy, sys
peak = lambda: re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1]
atexit.register(lambda: print(peak(), file=sys.stderr))
runpy.run_module("streamavg", run_name="__main__", alter_sys=True)
"""  # `python -m streamavg`, which prints its peak resident memory (kB) last on stderr


def test_keras_output_is_a_valid_zip_with_the_weights_in_place(checkpoints, tmp_path):
    out = tmp_path / "avg.keras"
    streamavg.average([checkpoints / "k3-keras"], output=out)
    newest = files(checkpoints / "k3-keras")[-1]
    with zipfile.ZipFile(out) as z, zipfile.ZipFile(newest) as template:
        assert z.testzip() is None  # every member's CRC checks out
        assert sorted(z.namelist()) == sorted(template.namelist())
        for name in template.namelist():
            if name != WEIGHTS_MEMBER:
                assert z.read(name) == template.read(name)
        weights = z.getinfo(WEIGHTS_MEMBER)
        assert (weights.header_offset, weights.compress_type) == (0, zipfile.ZIP_STORED)
        assert weights.date_time == template.getinfo(WEIGHTS_MEMBER).date_time
        image = z.read(WEIGHTS_MEMBER)
    assert image.startswith(b"\x89HDF\r\n\x1a\n")
    assert out.read_bytes()[keras_zip.HEADER :].startswith(image)


@given(st.binary(), st.binary())
def test_crc32_combine_is_the_crc_of_the_concatenation(a, b):
    assert keras_zip.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def with_asset(template: Path, dest: Path, name: str, data: bytes) -> Path:
    """A copy of the `.keras` archive `template` with member `name` added, deflated."""
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            out.writestr(info, src.read(info))
        out.writestr(name, data, zipfile.ZIP_DEFLATED, compresslevel=1)
    return dest


def peak_memory(*args: object) -> int:
    """Run `python -m streamavg ARGS --quiet` to completion; its peak resident memory in
    bytes, as it reads it itself on exit (VmHWM): a child's rusage counts the memory of
    the process that started it, which has Keras loaded here."""
    cmd = [sys.executable, "-c", PEAK, *map(str, args), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return int(run.stderr.split()[-1]) << 10  # kB


def test_a_large_deflated_asset_is_copied_as_stored_in_flat_memory(checkpoints, tmp_path):
    # 64 MiB of text-like bytes (2 bits of entropy a byte), deflated about 3:1
    asset = np.random.default_rng(0).integers(97, 101, ASSET, dtype=np.uint8).tobytes()
    plain, big = files(checkpoints / "k3-keras")[-2:], []
    for path in plain:
        big.append(with_asset(path, tmp_path / path.name, "assets/big.bin", asset))
    baseline = peak_memory(*plain, "-o", tmp_path / "plain.keras")
    peak = peak_memory(*big, "-o", tmp_path / "avg.keras")
    assert peak < baseline + ASSET // 2, (peak, baseline)

    with zipfile.ZipFile(tmp_path / "avg.keras") as z, zipfile.ZipFile(big[-1]) as template:
        assert z.testzip() is None
        assert sorted(z.namelist()) == sorted(template.namelist())
        for info in template.infolist():
            if info.filename == WEIGHTS_MEMBER:
                continue
            got = z.getinfo(info.filename)
            assert (got.compress_type, got.compress_size, got.file_size, got.CRC) == (
                info.compress_type, info.compress_size, info.file_size, info.CRC,
            )  # fmt: skip
            assert z.read(info.filename) == template.read(info.filename)
        assert z.getinfo("assets/big.bin").compress_type == zipfile.ZIP_DEFLATED
    restored = keras.saving.load_model(tmp_path / "avg.keras", compile=False).get_weights()
    want = keras.saving.load_model(tmp_path / "plain.keras", compile=False).get_weights()
    assert len(restored) == len(want)
    for got, expected in zip(restored, want, strict=True):
        np.testing.assert_array_equal(got, expected)

    with keras_zip.Archive(big[-1]) as ck:
        (companion,) = (c for c in ck.companions() if c.name == "assets/big.bin")
        pieces = [len(chunk) for chunk in companion.chunks()]
    assert (companion.role, companion.size, sum(pieces)) == ("meaning", ASSET, ASSET)
    assert max(pieces) == keras_zip.CHUNK == 1 << 20
