"""The HDF5 reader's shortcut: checkpoints of one run share the newest's listing only when
their bytes outside the tensors' data are the newest's, so they list exactly as a full
reading would; any other file is read in full."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import h5py
import pytest
from conftest import CASES, files

from streamavg.formats import open_checkpoint


def listing(ck) -> tuple:
    """What a reader knows of a checkpoint's tensors: names, shapes, dtypes, file offsets."""
    return ck.format, ck.tensors, ck._offsets


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_of_one_run_share_the_listing_of_the_newest(checkpoints, case):
    *older, newest = files(checkpoints / case)
    with open_checkpoint(newest) as ref:
        for path in older:
            with open_checkpoint(path, like=ref) as shared, open_checkpoint(path) as full:
                assert shared._like is ref and full._like is None
                assert listing(shared) == listing(full)
                assert shared.read_whole(next(iter(full.tensors))).tobytes() == (
                    full.read_whole(next(iter(full.tensors))).tobytes()
                )


@pytest.mark.parametrize("case", ["k3-weights", "k2-h5"])
def test_a_file_built_otherwise_is_listed_in_full(checkpoints, tmp_path, case):
    """One attribute added (metadata, not data): not the newest's bytes, so not its
    listing, and the full listing is the one a fresh reading gives."""
    *older, newest = files(checkpoints / case)
    other = shutil.copy(older[0], tmp_path / older[0].name)
    with h5py.File(other, "r+") as f:
        f.attrs["note"] = "edited"
    with open_checkpoint(newest) as ref, open_checkpoint(other, like=ref) as ck:
        assert ck._like is None
        with open_checkpoint(other) as full:
            assert listing(ck) == listing(full)


def test_h5py_is_imported_on_first_use_from_any_thread():
    """A run of other containers never imports h5py; threads that open HDF5 checkpoints
    at once all find it whole."""
    code = textwrap.dedent(
        """
        import sys, threading
        import streamavg.cli
        from streamavg.formats import hdf5
        assert "h5py" not in sys.modules
        barrier, got = threading.Barrier(8), []
        def use():
            barrier.wait()
            got.append(hdf5.h5py.File)
        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        import h5py
        assert got == [h5py.File] * 8, got
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
