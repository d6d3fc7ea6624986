"""The adapter contract: every container's module and checkpoints implement the protocols
in `formats.base`, and the modules above the adapters name no container."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import files

import streamavg
from streamavg import formats
from streamavg.formats.base import Adapter, Reader, Write

PACKAGE = Path(streamavg.__file__).parent
CONTAINERS = {m.__name__.rsplit(".", 1)[-1] for m in formats.ADAPTERS}
#: Modules that must work through the protocols alone.
ABOVE = ["engine.py", "evaluate.py", "synthesis.py", "api.py", "cli.py", "sweeps.py"]
ABOVE += ["cluster.py", "companions.py", "output.py", "select.py"]


def test_every_adapter_module_is_an_adapter():
    assert {"bundle", "hdf5", "keras_sharded", "keras_zip", "orbax", "safetensors"} == CONTAINERS
    for adapter in formats.ADAPTERS:
        assert isinstance(adapter, Adapter), adapter.__name__
        assert set(adapter.SUFFIXES) >= set(adapter.ACCEPTED), adapter.__name__


def kinds(checkpoints: Path, containers: Path) -> dict[str, Path]:
    """One checkpoint of every format streamavg reads, by format."""
    found = {
        "keras": files(checkpoints / "k3-keras")[-1],
        "keras-weights": files(checkpoints / "k3-weights")[-1],
        "legacy-h5": files(checkpoints / "k3-h5")[-1],
        "legacy-weights": files(checkpoints / "k2-weights")[-1],
        "keras-sharded": containers / "keras-sharded" / "epoch_3.weights.json",
        "keras-dir": containers / "keras-dir" / "epoch_3",
        "safetensors": containers / "safetensors" / "step_300.safetensors",
        "huggingface": containers / "safetensors-dir" / "checkpoint-300",
    }
    return found  # Orbax's, in test_orbax.py (its checkpoints take a JAX process to write)


def test_every_checkpoint_is_a_reader_and_writes_through_a_writer(
    checkpoints, containers, tmp_path
):
    for fmt, path in kinds(checkpoints, containers).items():
        with formats.open_checkpoint(path) as ck:
            assert ck.format == fmt
            assert isinstance(ck, Reader), fmt
            name = next(n for n, t in ck.tensors.items() if t.averaged)
            dest = tmp_path / fmt / f"out{formats.SUFFIXES[fmt]}"
            options = {"optimizer": False, "provenance": {}, "overwrite": False}
            with ck.write_like(dest, [name], **options) as write:
                assert isinstance(write, Write), fmt
                assert write.targets is not None and name in write.targets.places, fmt
                write(name, ck.read_whole(name))
        with formats.open_checkpoint(dest) as out:
            assert isinstance(out, Reader) and out.format == fmt


@pytest.mark.parametrize("module", ABOVE)
def test_modules_above_the_adapters_import_no_container(module):
    tree = ast.parse((PACKAGE / module).read_text())
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[-2:-1] == ["formats"]:
                named.add(parts[-1])
            if parts[-1] == "formats":
                named |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            named |= {alias.name.rsplit(".", 1)[-1] for alias in node.names}
    assert not named & CONTAINERS, (module, named & CONTAINERS)
