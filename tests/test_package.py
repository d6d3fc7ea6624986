"""The distributions a user installs: what the wheel and the sdist hold, and their metadata."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from streamavg import __version__

ROOT = Path(__file__).parent.parent


def committed() -> list[str]:
    """The repository's files, as a release's clean clone holds them."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The sdist and the wheel, built from the committed files, as a release would be."""
    tree = tmp_path_factory.mktemp("tree")
    for name in committed():
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    out = tree / "dist"
    (sdist,) = _build("sdist", tree, out).glob("*.tar.gz")
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:  # the wheel from the sdist, as pip makes it
        tar.extractall(unpacked, filter="data")
    unpacked /= sdist.name.removesuffix(".tar.gz")
    (wheel,) = _build("wheel", unpacked, out).glob("*.whl")
    return sdist, wheel


def _build(kind: str, source: Path, out: Path) -> Path:
    """Build a distribution of `kind` with setuptools, as a build front end would."""
    code = f"import sys; from setuptools import build_meta; build_meta.build_{kind}(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_wheel_holds_the_package_its_license_and_py_typed(built):
    with zipfile.ZipFile(built[1]) as z:
        names = z.namelist()
        info = f"streamavg-{__version__}.dist-info"
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert z.read("streamavg/py.typed") == b""
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
    assert {n.split("/")[0] for n in names} == {"streamavg", info}
    assert "streamavg/cli.py" in names and "streamavg/callbacks/ema.py" in names
    assert meta["License-Expression"] == "Apache-2.0"
    assert sorted(meta.get_all("Provides-Extra")) == [
        "dask",
        "keras",
        "orbax",
        "remote",
        "tensorflow",
        "tutorial",
    ]  # no test tools in a published extra: they are the `test` dependency group
    urls = dict(u.split(", ") for u in meta.get_all("Project-URL"))
    assert sorted(urls) == ["Changelog", "Documentation", "Homepage", "Issues", "Source"]
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers and meta.get_all("Keywords")
    assert meta.get_payload() == (ROOT / "README.md").read_text()


def test_the_sdist_leaves_the_tests_out_on_purpose(built):
    with tarfile.open(built[0]) as tar:
        top = f"streamavg-{__version__}"
        names = {m.name.removeprefix(f"{top}/") for m in tar.getmembers() if m.isfile()}
        license_text = tar.extractfile(f"{top}/LICENSE").read()
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert {"README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in"} <= names
    assert "streamavg/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "docs/"))]
    package = {n for n in committed() if n.startswith("streamavg/") and n.endswith(".py")}
    assert {n for n in names if n.endswith(".py")} == package
