"""The documentation runs as written: README.md and the site's pages under docs/.

Code blocks follow one convention, checked here:

- `python`: run twice in the same empty folder, as a user repeating it would; what it
  prints and the files it leaves are checked by the function PYTHON names for it.
- `bash`: only `streamavg` and `python -m streamavg` commands, run in that folder after
  the blocks before them; what they print must match the `text` block right after
  (`...` alone on a line stands for any lines, inside a line for any text; the time and
  memory of a run's summary line may differ).
- `console`: shown, not run; NOT_RUN says why, for each.
- `text`: output and listings.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from html import unescape
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml

from streamavg import cli

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LANGUAGES = {"python", "bash", "console", "text"}
TRAINING = ("index.md", "A run to average")  # the getting-started run other pages start from
SETUP = {"README.md": TRAINING, "sweep.md": TRAINING}  # pages that use its checkpoints


class Block(NamedTuple):
    page: str
    heading: str  # the nearest heading above the block
    language: str
    code: str
    line: int


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found, heading, fence = [], "", None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            opening = re.match(r"^(\s*)```(\S*)\s*$", line)
            if opening:
                fence, body, start = opening.group(2), [], number
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            found.append(Block(path.name, heading, fence, "".join(body), start))
            fence = None
        else:
            body.append(line + "\n")
    assert fence is None, f"{path.name}: a fence opened at line {start} never closes"
    return found


BLOCKS = [b for page in PAGES for b in blocks(page)]

NOT_RUN = {  # console blocks: (page, heading) -> why the tests do not run them
    ("README.md", "Try it"): "runs the whole demo or the whole test suite",
    ("README.md", "Install"): "installs from PyPI",
    ("index.md", "Install"): "installs from PyPI",
    ("formats.md", "Hugging Face, PEFT and KerasHub"): (
        "needs folders written by transformers, peft and keras-hub (tests/test_hub.py "
        "averages such folders)"
    ),
    ("sweep.md", "The tutorial's experiment"): "trains 500 epochs (scripts/tutorial.py)",
    ("performance.md", "Performance"): "a benchmark of about 20 minutes and 30 GB",
    ("performance.md", "Per dtype, and against the PyTorch tools"): (
        "benchmarks of 266 MB checkpoints, and one that installs torch and mergekit"
    ),
    ("performance.md", "Many small tensors, and every container"): "a benchmark",
    ("remote.md", "Object storage"): "needs a bucket (tests/test_remote.py uses moto's S3)",
    ("remote.md", "Clusters: the fold on Dask"): "needs a Dask scheduler and a shared disk",
    ("development.md", "Testing"): "runs the test suite",
    ("development.md", "The documentation"): "builds or serves the site (a test builds it)",
}


def run_twice(code: str, where: str, capsys) -> tuple[list[str], dict]:
    """Run `code` twice in the current folder; what each run printed, and the last's names."""
    printed, names = [], {}
    for _ in range(2):
        names = {"__name__": "__main__"}
        exec(compile(code, where, "exec"), names)
        printed.append(capsys.readouterr().out)
    return printed, names


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# What each python block must print and leave: (page, heading) -> check(printed, names).
def check_training(printed: str, names: dict) -> None:
    assert printed == ""
    assert listing(Path("ckpts")) == [f"model_{e:02d}.keras" for e in range(1, 7)]
    rows = Path("training.csv").read_text().splitlines()
    assert rows[0] == "epoch,accuracy,loss,val_accuracy,val_loss"
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(6)]
    with np.load("heldout.npz") as data:
        assert (data["x"].shape, data["y"].shape) == ((64, 8), (64,))


def check_api(printed: str, names: dict) -> None:
    import streamavg

    lines = printed.splitlines()
    files = [f"model_{e:02d}.keras" for e in (3, 4, 5, 6)]
    weights = [round(float(w), 3) for w in streamavg.scheme_weights("linear", 4)]
    assert lines == [f"{files} {weights}", str(streamavg.scheme_weights("exp", 4, alpha=2.0))]
    assert listing(Path()) == [
        "averaged.keras",
        "avg.keras",
        "ckpts",
        "exp.keras",
        "heldout.npz",
        "training.csv",
    ]
    linear = streamavg.average_tensors(["ckpts/"], scheme="linear", last=4)
    assert_same_tensors(streamavg.average_tensors(["avg.keras"]), linear)
    exp = streamavg.average_tensors(["ckpts/"], scheme="exp", alpha=2.0)
    assert_same_tensors(streamavg.average_tensors(["exp.keras"]), exp)
    model = names["model"]  # loaded with the linear average of the last 4
    assert_same_tensors(
        {str(i): w for i, w in enumerate(model.get_weights())},
        dict(zip(map(str, range(4)), linear.values(), strict=True)),
    )


def check_readme(printed: str, names: dict) -> None:
    import streamavg

    assert printed == "avg.keras [0.167, 0.333, 0.5]\n"
    linear = streamavg.average_tensors(["ckpts/"], scheme="linear", last=3)
    assert_same_tensors(streamavg.average_tensors(["avg.keras"]), linear)
    assert listing(Path()) == ["avg.keras", "ckpts", "heldout.npz", "training.csv"]


def check_callbacks(printed: str, names: dict) -> None:
    assert "'val_ema_accuracy', 'val_ema_loss', 'val_loss'" in printed
    # The state file and the backup go once fit completes; the averaged weights stay.
    assert listing(Path()) == ["ema.weights.h5"]


def check_post_hoc_ema(printed: str, names: dict) -> None:
    assert printed == "12 1.0\n"
    snaps = [f"phema-{s}-{t:09d}.weights.h5" for s in ("0.05", "0.1") for t in range(50, 301, 50)]
    states = ["phema-0.05.state.h5", "phema-0.1.state.h5"]
    assert listing(Path("snapshots")) == sorted(["model.keras", *states, *snaps])
    assert listing(Path()) == ["ema-0.07.weights.h5", "snapshots", "test.npz"]


def check_safetensors(printed: str, names: dict) -> None:
    assert printed == ""
    assert listing(Path("sft")) == [f"step-{s}.safetensors" for s in (100, 200, 300)]


def check_sweep(printed: str, names: dict) -> None:
    assert printed == "[1, 2, 3, 4, 5, 6] True\nTrue True\n"
    result, soup = names["result"], names["soup"]
    assert result.scores[result.best] == max(result.scores.values())
    assert [p.name for p in soup.singles] == [f"model_{e:02d}.keras" for e in range(1, 7)]
    assert soup.kept[0] == max(soup.singles, key=soup.singles.get)
    assert set(soup.kept) <= set(soup.singles)


PYTHON: dict[tuple[str, str], Callable[[str, dict], None]] = {
    TRAINING: check_training,
    ("index.md", "Python"): check_api,
    ("README.md", "Use"): check_readme,
    ("callbacks.md", "Callbacks: averaging during training"): check_callbacks,
    ("posthoc-ema.md", "Post-hoc EMA: choose the EMA length after training"): (check_post_hoc_ema),
    ("formats.md", "safetensors, from any framework"): check_safetensors,
    ("sweep.md", "How many checkpoints? `streamavg sweep` and the tutorial's experiment"): (
        check_sweep
    ),
}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def commands(code: str) -> list[list[str]]:
    """The streamavg command lines of a bash block, as the arguments after the command."""
    found = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert not {"|", "||", "&&", ";", ">", "<", "&"} & set(words), line
        if words[:3] == ["python", "-m", "streamavg"]:
            found.append(words[3:])
        else:
            assert words[0] == "streamavg", f"not a streamavg command: {line}"
            found.append(words[1:])
    return found


SUMMARY = re.compile(r" in \d+\.\d+ s, peak memory \d+ MB$")  # the one part that varies


def pattern(expected: list[str]) -> re.Pattern:
    parts = []
    for line in expected:
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            line = SUMMARY.sub(" in T s, peak memory M MB", line)
            parts.append(re.escape(line).replace(re.escape("..."), r"[^\n]*?") + r"\n")
    return re.compile("".join(parts))


def assert_prints(expected: str, out: str, err: str) -> None:
    """`out` and `err` are what `expected` shows: its `streamavg: ` lines on stderr."""
    lines = expected.splitlines()
    shown_err = [line for line in lines if line.startswith("streamavg: ")]
    shown_out = [line for line in lines if not line.startswith("streamavg: ")]
    out = "".join(
        SUMMARY.sub(" in T s, peak memory M MB", line) + "\n" for line in out.splitlines()
    )
    assert pattern(shown_out).fullmatch(out), f"printed:\n{out}\nshown:\n{expected}"
    assert err == "".join(line + "\n" for line in shown_err)


def run_bash(block: Block, shown: Block, capsys) -> None:
    from streamavg.cli import main

    assert shown.language == "text", f"{block.page}:{block.line}: no output shown after it"
    out, err = [], []
    for argv in commands(block.code):
        status = main(argv)
        printed = capsys.readouterr()
        out.append(printed.out)
        err.append(printed.err)
        assert status == 0, f"streamavg {shlex.join(argv)}: exit {status}\n{printed.err}"
    assert_prints(shown.code, "".join(out), "".join(err))


RUNNABLE = [p for p in PAGES if any(b.language in ("python", "bash") for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_the_page_runs_as_written(page, tmp_path, monkeypatch, capsys):
    """Each page's python and bash blocks, in order, in one empty folder."""
    monkeypatch.chdir(tmp_path)
    if page.name in SETUP:
        first = next(b for b in BLOCKS if (b.page, b.heading) == SETUP[page.name])
        exec(compile(first.code, first.page, "exec"), {"__name__": "__main__"})
    found = blocks(page)
    for i, block in enumerate(found):
        where = f"{block.page}:{block.line}"
        if block.language == "python":
            (first, second), names = run_twice(block.code, where, capsys)
            assert first == second, where
            PYTHON[block.page, block.heading](first, names)
        elif block.language == "bash":
            assert i + 1 < len(found), f"{where}: no output shown after it"
            run_bash(block, found[i + 1], capsys)


def test_every_block_is_run_or_listed():
    """Every block is in a known language; every python block has its checks, every
    console block its reason not to run; nothing listed is missing from the pages."""
    assert {b.language for b in BLOCKS} <= LANGUAGES, [
        f"{b.page}:{b.line} {b.language!r}" for b in BLOCKS if b.language not in LANGUAGES
    ]
    python = [(b.page, b.heading) for b in BLOCKS if b.language == "python"]
    assert sorted(python) == sorted(PYTHON)
    console = {(b.page, b.heading) for b in BLOCKS if b.language == "console"}
    assert console == set(NOT_RUN)
    bash = [b for b in BLOCKS if b.language == "bash"]
    assert {b.page for b in bash} == {
        "README.md",
        "index.md",
        "formats.md",
        "posthoc-ema.md",
        "sweep.md",
    }
    for b in bash:
        assert commands(b.code), f"{b.page}:{b.line}: no command"


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first = next(b for b in BLOCKS if b.page == "README.md")
    assert first.code.splitlines()[0].startswith("scripts/demo.sh")
    assert first.code.splitlines()[1].startswith("scripts/test.sh")
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_url"]
    pages = {Path(p).stem for p in nav_pages()} - {"index"}
    linked = set(re.findall(rf"\]\({re.escape(site)}([\w-]+)/\)", text))
    assert linked == pages
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        prefix = "https://raw.githubusercontent.com/streamavg/streamavg/main/docs/"
        assert image.startswith(prefix) and (DOCS / image.removeprefix(prefix)).is_file()


def test_every_test_the_docs_name_exists():
    """The Guarantees cite tests by name: each must exist, or the promise has no test."""
    cited = {
        page.name: set(re.findall(r"(test_\w+\.py)::(test_\w+)", page.read_text()))
        for page in PAGES
    }
    assert len(cited["guarantees.md"]) >= 30
    for module, name in sorted(set().union(*cited.values())):
        source = (ROOT / "tests" / module).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{module}::{name}"


def test_the_module_map_is_the_tree():
    """Development's map of modules names every module of the package, and only those."""
    section = (DOCS / "development.md").read_text().split("\n## Module map")[1]
    listing_ = re.search(r"```text\nstreamavg/\n(.*?)```", section, re.S).group(1)
    listed, folder = set(), ""
    for line in listing_.splitlines():
        entry = line.split()[0] if line.strip() else ""
        if entry.endswith("/"):
            folder = entry
        elif entry.endswith(".py"):
            top = line.startswith("  ") and not line.startswith("    ")
            listed.add(entry if top else folder + entry)
    package = ROOT / "streamavg"
    tree = {
        p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"
    }
    assert listed == tree


def nav_pages() -> list[str]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [page for entry in nav for page in entry.values()]


def test_the_navigation_lists_every_page():
    pages = nav_pages()
    assert len(pages) == len(set(pages))
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))
    assert pages[0] == "index.md"


def hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks/cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_strings() -> dict[str, list[str]]:
    return {
        command: [s for action in parser._actions for s in action.option_strings]
        for command, parser in cli.parsers().items()
    }


def test_the_cli_reference_covers_every_command_and_option():
    reference = hook()
    typed = re.findall(r"^\s*(streamavg \w+) ", cli.USAGE, re.M)  # the usage's commands
    assert list(cli.parsers()) == ["streamavg", *typed]
    assert typed == ["streamavg inspect", "streamavg sweep", "streamavg phema"]
    assert (DOCS / "cli.md").read_text().count(reference.MARKER) == 1
    rendered = reference.render()
    sections = re.split(r"^## ", rendered, flags=re.M)[1:]
    options = option_strings()
    assert [s.split("\n", 1)[0] for s in sections] == [f"`{c}`" for c in options]
    for section, (command, strings) in zip(sections, options.items(), strict=True):
        assert "--help" in strings and len(strings) >= 2, command
        for s in strings:
            assert f"`{s}" in section, f"{command} {s}"


def test_the_site_builds_without_warnings(tmp_path):
    """mkdocs build --strict, as scripts/test.sh runs it; the built CLI page names every
    option of every command, rendered by the hook at build time."""
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr
    page = unescape(re.sub(r"<[^>]+>", "", (site / "cli/index.html").read_text()))
    for command, strings in option_strings().items():
        assert command in page
        for s in strings:
            assert s in page, f"{command} {s}"
    for name in nav_pages():
        stem = Path(name).stem
        assert (site / ("index.html" if stem == "index" else f"{stem}/index.html")).is_file()
