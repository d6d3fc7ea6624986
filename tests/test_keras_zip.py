"""A .keras output is a valid zip whose weights member is the HDF5 file written in place."""

from __future__ import annotations

import zipfile
import zlib

from conftest import files
from hypothesis import given
from hypothesis import strategies as st

import streamavg
from streamavg.formats import keras_zip
from streamavg.formats.keras_zip import WEIGHTS_MEMBER


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
