"""Outputs are a function of the inputs alone: the same bytes from every run."""

from __future__ import annotations

import time

import streamavg
from streamavg import publish

CASES = {"k3-keras": ".keras", "k3-h5": ".h5", "k3-weights": ".weights.h5", "k2-h5": ".h5"}


def test_the_same_inputs_give_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    """No creation times (HDF5 keeps them to the second), and flushing to disk while
    writing, here after every piece, changes nothing."""

    def run(label: str) -> dict:
        return {
            case: streamavg.average(
                [checkpoints / case], output=tmp_path / f"{case}-{label}{suffix}"
            ).output.read_bytes()
            for case, suffix in CASES.items()
        }

    first = run("first")
    time.sleep(1.1)
    monkeypatch.setattr(publish, "FLUSH_BYTES", 1)
    second = run("second")
    for case in CASES:
        assert first[case] == second[case], case
