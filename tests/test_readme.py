"""The README's Python examples run as written, and again in the same place."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

README = Path(__file__).parent.parent / "README.md"


def example(heading: str) -> str:
    section = README.read_text().split(f"\n## {heading}")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_twice(code: str, directory: Path, capsys) -> list[str]:
    """Run `code` twice in `directory`, as a user repeating it would; what each run printed."""
    cwd = os.getcwd()
    os.chdir(directory)
    printed = []
    try:
        for _ in range(2):
            exec(compile(code, str(README), "exec"), {})
            printed.append(capsys.readouterr().out)
    finally:
        os.chdir(cwd)
    return printed


def test_the_python_example_runs_twice(tmp_path, capsys):
    import streamavg

    first, second = run_twice(example("Python"), tmp_path, capsys)
    assert first == second
    names = [f"model_{e:02d}.keras" for e in (3, 4, 5, 6)]
    weights = [round(float(w), 3) for w in streamavg.scheme_weights("linear", 4)]
    assert first.splitlines()[0] == f"{names} {weights}"
    assert first.splitlines()[1] == str(streamavg.scheme_weights("exp", 4, alpha=2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.keras", "ckpts", "exp.keras"]
    linear = streamavg.average_tensors([tmp_path / "ckpts"], scheme="linear", last=4)
    saved = streamavg.average_tensors([tmp_path / "avg.keras"])
    assert linear.keys() == saved.keys()
    for name in linear:
        np.testing.assert_array_equal(saved[name], linear[name])


def test_the_callbacks_example_runs_twice(tmp_path, capsys):
    first, second = run_twice(example("During training"), tmp_path, capsys)
    assert "'val_ema_accuracy', 'val_ema_loss', 'val_loss'" in first
    assert second == first
    # The state file and the backup go once fit completes; the averaged weights stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.weights.h5"]


def test_the_post_hoc_ema_example_runs_twice(tmp_path, capsys):
    first, second = run_twice(example("Post-hoc EMA"), tmp_path, capsys)
    assert first == second == "12 1.0\n"
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    snaps = [f"phema-{s}-{t:09d}.weights.h5" for s in ("0.05", "0.1") for t in range(50, 301, 50)]
    assert names == sorted(["model.keras", "phema-0.05.state.h5", "phema-0.1.state.h5", *snaps])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-0.07.weights.h5", "snapshots"]


def test_every_test_the_readme_names_exists():
    """The Guarantees cite tests by name: each must exist, or the promise has no test."""
    cited = set(re.findall(r"(test_\w+\.py)::(test_\w+)", README.read_text()))
    assert cited
    for module, name in sorted(cited):
        source = (README.parent / "tests" / module).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{module}::{name}"


def test_the_module_list_is_the_tree():
    """Develop's list of modules names every module of the package, and only those."""
    section = README.read_text().split("\n## Develop")[1]
    listing = re.search(r"```\nstreamavg/\n(.*?)```", section, re.S).group(1)
    listed, folder = set(), ""
    for line in listing.splitlines():
        entry = line.split()[0] if line.strip() else ""
        if entry.endswith("/"):
            folder = entry
        elif entry.endswith(".py"):
            listed.add(
                entry if line.startswith("  ") and not line.startswith("    ") else folder + entry
            )
    package = README.parent / "streamavg"
    tree = {
        p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"
    }
    assert listed == tree
