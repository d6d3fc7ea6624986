"""Outputs are a function of the inputs alone: the same bytes from every run."""

from __future__ import annotations

import time

import pytest

import streamavg
from streamavg import output


@pytest.mark.parametrize(
    ("case", "suffix"), [("k3-keras", ".keras"), ("k3-h5", ".h5"), ("k3-weights", ".weights.h5")]
)
def test_the_same_inputs_give_the_same_bytes(checkpoints, tmp_path, monkeypatch, case, suffix):
    """No creation times (HDF5 keeps them to the second), and flushing to disk while
    writing, here after every piece, changes nothing."""
    first = streamavg.average([checkpoints / case], output=tmp_path / f"first{suffix}").output
    time.sleep(1.1)
    monkeypatch.setattr(output, "FLUSH_BYTES", 1)
    second = streamavg.average([checkpoints / case], output=tmp_path / f"second{suffix}").output
    assert first.read_bytes() == second.read_bytes()
