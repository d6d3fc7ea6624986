"""The Keras range the callbacks support: declared once in the compat module, the same as
pyproject's [keras] extra, refused outside it in one line; and no Keras internal used
anywhere else in streamavg."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import pytest

from streamavg.callbacks import _keras_compat as compat

ROOT = Path(__file__).parent.parent


def test_the_keras_extra_declares_the_range_the_callbacks_check():
    pyproject = (ROOT / "pyproject.toml").read_text()  # the [keras] extra's line
    assert re.findall(r'^keras = \["keras(.*?)"\]', pyproject, re.MULTILINE) == [compat.SUPPORTED]
    documented = (ROOT / "docs" / "callbacks.md").read_text()  # what the docs promise
    assert re.findall(r"`keras(>=[\d.]+,<[\d.]+)`", documented) == [compat.SUPPORTED]
    assert compat.SUPPORTED == ">=3.11,<3.16"


@pytest.mark.parametrize("version", ["3.11.0", "3.11.0rc1", "3.12.4", "3.15.1", keras.__version__])
def test_versions_in_the_range_are_accepted(version):
    compat.check_keras_version(version)


@pytest.mark.parametrize(
    "version", ["2.15.0", "3.0.5", "3.10.0", "3.16.0", "3.16.0.dev2026010203", "4.0.0", "nightly"]
)
def test_versions_outside_the_range_are_refused_in_one_line(version):
    with pytest.raises(RuntimeError) as e:
        compat.check_keras_version(version)
    assert str(e.value) == (
        f"streamavg.callbacks needs Keras >=3.11,<3.16, not {version}: "
        "pip install 'streamavg[keras]'"
    )


# What the callbacks and sweeps use of Keras's and torch's internals, each only through the
# compat module (attributes of other objects than `self`).
INTERNALS = re.compile(
    r"keras\.src|_use_cached_eval_dataset|torch\._|\.apply =|\"apply\"|getattr\(\w+, \"_(?!_)"
    r"|(?<!self)\._(iterations|layout|flatten_layers|make_function|get_state_sharding_spec"
    r"|direction)\b"
)


def test_keras_internals_are_used_in_the_compat_module_only():
    compat_file = Path(compat.__file__)
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "streamavg").rglob("*.py"))
        if path != compat_file
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert found == []
