"""The command line: tables, summaries, inspection, and one clear line for every bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import suppress
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import files, snapshot

import streamavg
from streamavg import __version__, scheme_weights
from streamavg.cli import _parser, main
from streamavg.errors import UsageError
from streamavg.formats import open_checkpoint
from streamavg.select import KINDS


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- bad input: one line, the right exit code, nothing written, inputs untouched -----------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit(path: Path, change) -> None:
    with h5py.File(path, "a") as f:
        change(f)


def set_first(name: str, value: float):
    def change(f: h5py.File) -> None:
        f[name][0] = value

    return change


def reshape(f: h5py.File) -> None:
    del f["layers/dense/vars/1"]
    f["layers/dense/vars/1"] = np.zeros(8, "float32")


def unwritten(f: h5py.File) -> None:
    """A dataset whose data was never written: HDF5 would read it back as zeros."""
    del f["layers/dense/vars/1"]
    f.create_dataset("layers/dense/vars/1", (16,), "float32")


def not_keras(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)


def no_weights_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")


# (case copied, how to damage it, extra arguments, expected message after "error: ", exit code)
BAD = {
    "missing directory": (None, None, [], "{d}/nope: no such file or directory", 1),
    "empty directory": ("empty", None, [], f"{{d}}/empty: no checkpoint {KINDS}", 1),
    "pattern matches nothing": (
        "k3-weights",
        None,
        ["--pattern", "*.pt"],
        "{d}/k3-weights: no checkpoint matches '*.pt'",
        1,
    ),
    "not HDF5": (
        "k3-weights",
        lambda d: (d / "model_3.weights.h5").write_text("hello"),
        [],
        "{d}/k3-weights/model_3.weights.h5: not a checkpoint "
        "(neither HDF5, .keras nor safetensors)",
        1,
    ),
    "HDF5 but not Keras": (
        "k3-weights",
        lambda d: not_keras(d / "model_3.weights.h5"),
        [],
        "{d}/k3-weights/model_3.weights.h5: HDF5 file holds no Keras weights",
        1,
    ),
    "truncated .keras zip": (
        "k3-keras",
        lambda d: truncate(d / "model_2.keras"),
        [],
        "{d}/k3-keras/model_2.keras: corrupt .keras archive (File is not a zip file)",
        1,
    ),
    ".keras without weights": (
        "k3-keras",
        lambda d: no_weights_member(d / "model_2.keras"),
        [],
        "{d}/k3-keras/model_2.keras: .keras archive has no model.weights.h5",
        1,
    ),
    "missing tensor": (
        "k3-weights",
        lambda d: edit(d / "model_2.weights.h5", lambda f: f.__delitem__("layers/dense/vars/1")),
        [],
        "{d}/k3-weights/model_2.weights.h5: layers/dense/vars/1: missing "
        "(present in {d}/k3-weights/model_5.weights.h5)",
        1,
    ),
    "tensor data never written": (
        "k3-weights",
        lambda d: edit(d / "model_4.weights.h5", unwritten),
        [],
        "{d}/k3-weights/model_4.weights.h5: layers/dense/vars/1: data is missing (truncated file?)",
        1,
    ),
    "shape mismatch": (
        "k3-weights",
        lambda d: edit(d / "model_2.weights.h5", reshape),
        [],
        "{d}/k3-weights/model_2.weights.h5: layers/dense/vars/1: shape (8,) float32 here, "
        "shape (16,) float32 in {d}/k3-weights/model_5.weights.h5",
        1,
    ),
    "dtype mismatch": (
        "k3-weights",
        lambda d: shutil.copy(d.parent / "f16" / "model_5.weights.h5", d / "model_0.weights.h5"),
        [],
        "{d}/k3-weights/model_0.weights.h5: layers/batch_normalization/vars/0: shape (16,) "
        "float16 here, shape (16,) float32 in {d}/k3-weights/model_5.weights.h5",
        1,
    ),
    "mixed formats": (
        "k3-weights",
        lambda d: shutil.copy(d.parent / "keras" / "model_1.keras", d / "model_0.keras"),
        [],
        "{d}/k3-weights/model_0.keras: mixed formats: keras here, keras-weights in "
        "{d}/k3-weights/model_5.weights.h5",
        1,
    ),
    "NaN": (
        "k3-weights",
        lambda d: edit(d / "model_3.weights.h5", set_first("layers/dense/vars/1", np.nan)),
        [],
        "{d}/k3-weights/model_3.weights.h5: layers/dense/vars/1: contains NaN or Inf "
        "(pass --allow-nonfinite to average anyway)",
        1,
    ),
    "Inf": (
        "k3-weights",
        lambda d: edit(d / "model_1.weights.h5", set_first("layers/dense/vars/0", np.inf)),
        [],
        "{d}/k3-weights/model_1.weights.h5: layers/dense/vars/0: contains NaN or Inf "
        "(pass --allow-nonfinite to average anyway)",
        1,
    ),
    "alpha zero": (
        "k3-weights",
        None,
        ["--scheme", "exp", "--alpha", "0"],
        "--alpha must be a positive number, got 0.0",
        2,
    ),
    "alpha negative": (
        "k3-weights",
        None,
        ["--scheme", "exp", "--alpha", "-1"],
        "--alpha must be a positive number, got -1.0",
        2,
    ),
    "last zero": ("k3-weights", None, ["--last", "0"], "--last must be at least 1, got 0", 2),
    "wrong number of weights": (
        "k3-weights",
        None,
        ["--weights", "1,2"],
        "--weights gives 2 weights for 5 checkpoints",
        2,
    ),
    "zero weight sum": (
        "k3-weights",
        None,
        ["--weights", "0,0,0,0,0"],
        "--weights must have a positive, finite sum",
        2,
    ),
    "weights not numbers": (
        "k3-weights",
        None,
        ["--weights", "a,b"],
        "argument --weights: not a comma-separated list of numbers: 'a,b'",
        2,
    ),
    "output is an input": (
        "k3-weights",
        None,
        ["-o", "{d}/k3-weights/model_5.weights.h5", "--overwrite"],
        "{d}/k3-weights/model_5.weights.h5: output is one of the inputs",
        2,
    ),
    "output exists": (
        "k3-weights",
        lambda d: (d.parent / "taken.weights.h5").write_bytes(b"keep me"),
        ["-o", "{d}/taken.weights.h5"],
        "{d}/taken.weights.h5: already exists (pass --overwrite to replace it)",
        2,
    ),
    "max memory too small": (
        "k3-weights",
        None,
        ["--max-memory", "512K"],
        "--max-memory must be at least 1M",
        2,
    ),
    "max memory not a size": (
        "k3-weights",
        None,
        ["--max-memory", "lots"],
        "argument --max-memory: not a size such as 256M or 1G: 'lots'",
        2,
    ),
    "unknown option": ("k3-weights", None, ["--bogus"], "unrecognized arguments: --bogus", 2),
    ".h5 output of .keras inputs": (
        "k3-keras",
        None,
        ["-o", "{d}/avg.h5"],
        "{d}/avg.h5: the inputs are keras files, so Keras reads the output only under a name "
        "ending in .keras",
        2,
    ),
    ".keras output of legacy .h5 inputs": (
        "k3-h5",
        None,
        ["-o", "{d}/avg.keras"],
        "{d}/avg.keras: the inputs are legacy-h5 files, so Keras reads the output only under "
        "a name ending in .h5 or .hdf5 (not .weights.h5)",
        2,
    ),
    "Keras 2 weights named like Keras 3 weights": (
        "k2-weights",
        None,
        ["-o", "{d}/avg.weights.h5"],
        "{d}/avg.weights.h5: the inputs are legacy-weights files, so Keras reads the output "
        "only under a name ending in .h5 or .hdf5 (not .weights.h5)",
        2,
    ),
    "Keras 3 weights named like a legacy file": (
        "k3-weights",
        None,
        ["-o", "{d}/avg.h5"],
        "{d}/avg.h5: the inputs are keras-weights files, so Keras reads the output only under "
        "a name ending in .weights.h5",
        2,
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_one_line_and_changes_nothing(checkpoints, tmp_path, capsys, name):
    case, damage, extra, message, code = BAD[name]
    d = tmp_path / "work"
    d.mkdir()
    shutil.copytree(checkpoints / "k3-weights-f16", d / "f16")
    shutil.copytree(checkpoints / "k3-keras", d / "keras")
    target = d / "nope"
    if case == "empty":
        target = d / "empty"
        target.mkdir()
    elif case:
        target = Path(shutil.copytree(checkpoints / case, d / case))
    if damage:
        damage(target)
    before = snapshot(d)
    got = run(capsys, target, *[a.format(d=d) for a in extra])
    assert got == (code, got[1], f"streamavg: error: {message.format(d=d)}\n")
    assert snapshot(d) == before  # inputs untouched, no output, no temporary file


def test_a_dry_run_refuses_what_the_run_refuses(checkpoints, capsys):
    for dry in ([], ["--dry-run"]):
        got = run(capsys, checkpoints / "k3-weights", "--max-memory", "512K", "-q", *dry)
        assert got == (2, "", "streamavg: error: --max-memory must be at least 1M\n")
    without_dask = (
        "import sys; sys.modules['distributed'] = None; from streamavg.cli import main; "
        f"sys.exit(main([{str(checkpoints / 'k3-weights')!r}, '-q', '--dry-run', "
        "'--scheduler', 'tcp://127.0.0.1:1']))"
    )
    out = subprocess.run([sys.executable, "-c", without_dask], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (
        2,
        "streamavg: error: --scheduler needs Dask: pip install 'streamavg[dask]'\n",
    )


def test_the_api_names_the_dask_extra_too(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    with pytest.raises(UsageError) as e:
        streamavg.average([checkpoints / "k3-weights"], output=tmp_path / "a.weights.h5", client=0)
    assert str(e.value) == "client needs Dask: pip install 'streamavg[dask]'"
    assert not (tmp_path / "a.weights.h5").exists()


def test_allow_nonfinite_averages_nan(case_copy, tmp_path, capsys):
    d = case_copy("k3-weights")
    edit(d / "model_3.weights.h5", set_first("layers/dense/vars/1", np.nan))
    out = tmp_path / "avg.weights.h5"
    assert run(capsys, d, "--allow-nonfinite", "-o", out)[0] == 0
    with h5py.File(out) as f:
        values = f["layers/dense/vars/1"][()]
    assert np.isnan(values[0]) and np.isfinite(values[1:]).all()


# -- normal runs ------------------------------------------------------------------------------


def test_table_and_summary(case_copy, tmp_path, capsys):
    d = case_copy("k3-weights")
    out = tmp_path / "avg.weights.h5"
    code, stdout, stderr = run(capsys, d, "--scheme", "linear", "-o", out)
    lines = stdout.splitlines()
    assert (code, stderr) == (0, "")
    assert lines[:6] == [
        "  #    weight  file",
        *(f"{i:>3}  {i / 15:8.6f}  {d}/model_{i}.weights.h5" for i in range(1, 6)),
    ]
    assert re.fullmatch(
        rf"averaged 5 files \(linear\) into {re.escape(str(out))} in \d+\.\d\d s, "
        r"peak memory \d+ MB",
        lines[6],
    )
    assert len(lines) == 7


def test_quiet_prints_only_the_summary(case_copy, tmp_path, capsys):
    d = case_copy("k3-weights")
    code, stdout, stderr = run(capsys, d, "-q", "-o", tmp_path / "avg.weights.h5")
    assert (code, stderr) == (0, "")
    assert len(stdout.splitlines()) == 1 and stdout.startswith("averaged 5 files (equal) into ")


def test_json_prints_the_run_as_one_object(case_copy, tmp_path):
    d = case_copy("k3-weights")
    out = tmp_path / "avg.weights.h5"
    args = [d, "--scheme", "linear", "-o", out, "--json"]  # a process of its own: its memory
    done = subprocess.run([sys.executable, "-m", "streamavg", *map(str, args)], capture_output=True)
    assert (done.returncode, done.stderr, done.stdout.count(b"\n")) == (0, b"", 1)
    got = json.loads(done.stdout)
    seconds, peak = got.pop("seconds"), got.pop("peak_memory")
    assert got == {
        "inputs": [
            {"path": f"{d}/model_{i}.weights.h5", "weight": w}
            for i, w in enumerate(scheme_weights("linear", 5).tolist(), 1)
        ],
        "scheme": "linear",
        "format": "keras-weights",
        "output": str(out),
        "dry_run": False,
        "bytes": out.stat().st_size,
        "notes": [],
    }
    assert isinstance(seconds, float) and 0 < seconds < 60
    assert isinstance(peak, int) and 10 << 20 < peak < 256 << 20
    assert got["inputs"][0]["weight"] == pytest.approx(1 / 15, rel=1e-15)


def test_json_holds_the_notes_and_a_dry_run_writes_nothing(case_copy, tmp_path, capsys):
    d = case_copy("k3-keras")
    for name, p in zip(["zeta", "alpha", "mid"], files(d)[:3], strict=True):
        p.rename(d / f"{name}.keras")
    for p in d.glob("model_*"):
        p.unlink()
    before = snapshot(d)
    code, stdout, stderr = run(capsys, d, "-o", tmp_path / "avg.keras", "--json", "--dry-run")
    assert (code, stderr) == (0, "")
    got = json.loads(stdout)
    assert (got["dry_run"], got["bytes"], got["output"]) == (
        True,
        None,
        str(tmp_path / "avg.keras"),
    )
    assert got["notes"] == ["file names carry no epoch number; ordered by modification time"]
    assert list(tmp_path.iterdir()) == [d] and snapshot(d) == before
    code, stdout, stderr = run(capsys, d, "-o", tmp_path / "avg.keras", "--json")
    assert (code, stderr) == (0, "")
    assert json.loads(stdout)["notes"] == got["notes"]


def test_json_counts_every_file_of_a_folder_output(tmp_path, capsys):
    from safetensors.numpy import save_file

    for step in (1, 2):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": np.full((3, 5), step, np.float32)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "toy"}')
    out = tmp_path / "avg"
    code, stdout, stderr = run(capsys, tmp_path / "run", "-o", out, "--json")
    assert (code, stderr) == (0, "")
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "model.safetensors"]
    assert json.loads(stdout)["bytes"] == sum(p.stat().st_size for p in out.iterdir())


def test_json_errors_stay_one_line_on_stderr(case_copy, tmp_path, capsys):
    d = case_copy("k3-weights")
    truncate(files(d)[2])
    code, stdout, stderr = run(capsys, d, "-o", tmp_path / "avg.weights.h5", "--json")
    assert (code, stdout, stderr.count("\n")) == (1, "", 1)
    assert stderr.startswith(f"streamavg: error: {files(d)[2]}: ")
    assert list(tmp_path.iterdir()) == [d]


def test_default_output_is_not_picked_up_by_a_later_scan(case_copy, capsys):
    d = case_copy("k3-keras")
    assert run(capsys, d, "--scheme", "exp")[0] == 0
    out = d / "averaged" / "model_5.avg-exp-n5.keras"
    code, stdout, _ = run(capsys, d, "--scheme", "exp", "--overwrite")
    assert code == 0 and out.is_file()
    assert stdout.count(".keras\n") == 5 and f"into {out} in " in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left


def test_natural_order_and_provenance(case_copy, tmp_path, capsys):
    d = case_copy("k3-keras")
    for i, p in enumerate(files(d), start=8):  # model_8 .. model_12: 10 and up sort after 9
        p.rename(d / f"model_{i}.keras")
    out = tmp_path / "avg.keras"
    assert run(capsys, d, "--scheme", "linear", "-o", out)[0] == 0
    with open_checkpoint(out) as ck:
        provenance = json.loads(ck.h5.attrs["streamavg"])
    assert provenance == {
        "streamavg": __version__,
        "scheme": "linear",
        "optimizer": "drop",
        "integers": "equal",
        "files": [f"model_{i}.keras" for i in range(8, 13)],
        "weights": scheme_weights("linear", 5).tolist(),
    }


def test_epochs_then_last(case_copy, tmp_path, capsys):
    d = case_copy("k2-weights")
    out = tmp_path / "avg.h5"
    code, stdout, _ = run(capsys, d, "--epochs", "2:4", "--last", "2", "-o", out)
    assert code == 0
    assert [line.split()[-1] for line in stdout.splitlines()[1:3]] == [
        f"{d}/weights_03.h5",
        f"{d}/weights_04.h5",
    ]


def test_names_without_numbers_fall_back_to_mtime(case_copy, tmp_path, capsys):
    d = case_copy("k3-keras")
    for name, p in zip(["zeta", "alpha", "mid"], files(d)[:3], strict=True):
        p.rename(d / f"{name}.keras")
    for p in d.glob("model_*"):  # the numbered ones go (beside them, the others are left out)
        p.unlink()
    code, _, stderr = run(capsys, d, "-o", tmp_path / "avg.keras")
    assert code == 0
    assert stderr == (
        "streamavg: note: file names carry no epoch number; ordered by modification time\n"
    )


def test_optimizer_state_dropped_or_kept(case_copy, tmp_path, capsys):
    d = case_copy("k3-h5")
    drop, keep = tmp_path / "drop.h5", tmp_path / "keep.h5"
    assert (
        run(capsys, d, "-o", drop)[0] == run(capsys, d, "-o", keep, "--optimizer", "newest")[0] == 0
    )
    with h5py.File(drop) as f:
        assert "optimizer_weights" not in f and "model_weights" in f
        assert dict(f.attrs)["model_config"] == h5py.File(files(d)[-1]).attrs["model_config"]
    with h5py.File(keep) as f, h5py.File(files(d)[-1]) as newest:
        kept = []
        newest["optimizer_weights"].visititems(
            lambda n, o: kept.append(n) if isinstance(o, h5py.Dataset) else None
        )
        for name in kept:
            assert np.array_equal(
                f["optimizer_weights"][name][()], newest["optimizer_weights"][name][()]
            )
        assert kept


# -- inspect and entry points ----------------------------------------------------------------


def test_inspect_recognises_content_not_extension(checkpoints, tmp_path, capsys):
    disguised = tmp_path / "model.h5"
    shutil.copy(files(checkpoints / "k3-keras")[0], disguised)
    code, stdout, _ = run(capsys, "inspect", disguised)
    lines = stdout.splitlines()
    assert code == 0
    head = re.fullmatch(
        rf"{re.escape(str(disguised))}: keras, (\d+) tensors, ([\d,]+) bytes "
        r"\([\d,]+ bytes on disk\)",
        lines[0],
    )
    parts = [re.fullmatch(r"\w+: (\d+) tensors?, ([\d,]+) bytes", line) for line in lines[-2:]]
    assert head and all(parts)  # the headline is the sum of its parts
    assert int(head[1]) == sum(int(m[1]) for m in parts)
    assert int(head[2].replace(",", "")) == sum(int(m[2].replace(",", "")) for m in parts)
    assert lines[1].split() == ["part", "tensor", "shape", "dtype", "bytes"]
    assert "model      layers/dense/vars/0" in stdout and "(6, 16)" in stdout
    assert "optimizer  optimizer/vars/0" in stdout
    assert lines[-2:] == [line for line in lines if line.startswith(("model:", "optimizer:"))]


def test_python_m_streamavg_imports_no_tensorflow(checkpoints, tmp_path):
    args = [str(checkpoints / "k3-keras"), "-q", "-o", str(tmp_path / "a.keras")]
    code = (
        f"import sys; from streamavg.cli import main; rc = main({args!r}); "
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'tf_keras', 'torch', 'jax')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 []"


@pytest.mark.parametrize("case", ["k3-keras-bf16", "k3-weights-f16"])
def test_bfloat16_and_float16_runs_import_no_ml_dtypes(checkpoints, tmp_path, case):
    """ml_dtypes takes most of a second to import: the fold widens and narrows bfloat16
    without it."""
    out = tmp_path / ("a.keras" if case.endswith("bf16") else "a.weights.h5")
    args = [str(checkpoints / case), "-q", "-o", str(out)]
    code = (
        f"import sys; from streamavg.cli import main; rc = main({args!r}); "
        "print(rc, 'ml_dtypes' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "0 False"


def test_entry_points():
    for command in (
        [sys.executable, "-m", "streamavg"],
        [str(Path(sys.executable).parent / "streamavg")],
    ):
        out = subprocess.run([*command, "--version"], capture_output=True, text=True)
        assert (out.returncode, out.stdout) == (0, f"streamavg {__version__}\n")
        out = subprocess.run([*command, "-V"], capture_output=True, text=True)
        assert (out.returncode, out.stdout) == (0, f"streamavg {__version__}\n")
        out = subprocess.run(command, capture_output=True, text=True)  # bare: usage, exit 2
        assert (out.returncode, out.stdout) == (2, "")
        assert out.stderr.startswith("usage: streamavg [options] PATH...")
        assert out.stderr.endswith("\nRun 'streamavg -h' for help.\n")
        help_text = subprocess.run([*command, "-h"], capture_output=True, text=True, check=True)
        assert help_text.stdout.startswith(out.stderr.splitlines()[0] + "\n")
        usage = help_text.stdout.split("\n\n")[0]
        assert "streamavg inspect FILE" in usage and "streamavg sweep PATH... --data NPZ" in usage
        assert "weighed alike (equal,\nthe default), or the newest most" in help_text.stdout
    assert _parser().get_default("scheme") == "equal"  # what the help says


def test_help_and_version_import_nothing_heavy():
    """-h and -V answer at once (scripts/bench_startup.py times them): the package imports
    numpy, h5py and the rest only when a command runs."""
    code = (
        "import contextlib, io, sys\n"
        "from streamavg.cli import main\n"
        "for argv in (['-V'], ['-h'], ['inspect', '-h'], ['sweep', '-h'], ['phema', '-h']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "ours = sorted(m for m in sys.modules if m.startswith('streamavg'))\n"
        "print(ours, 'numpy' in sys.modules)\n"
        "import streamavg\n"
        "print(streamavg.average.__module__, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    light = [
        "streamavg",
        "streamavg._version",
        "streamavg.choices",
        "streamavg.cli",
        "streamavg.errors",
    ]
    assert out.stdout.splitlines() == [f"{light} False", "streamavg.api True"]
    assert dir(streamavg) == sorted(streamavg.__all__)
    for name in streamavg.__all__:  # each lazy name is there, as the type checkers see it
        assert getattr(streamavg, name) is not None


def test_usage_errors_are_one_line_without_arguments_required_noise(capsys):
    assert run(capsys, "-o", "x.keras") == (
        2,
        "",
        "streamavg: error: the following arguments are required: PATH\n",
    )


@pytest.mark.parametrize(
    "url, why",
    [
        ("gs://bucket/avg.keras", "Please install gcsfs to access Google Storage"),
        ("foo://bucket/run/avg.keras", "Protocol not known: foo"),
        ("https://x.org/a.keras", "HTTP is read-only; write to object storage (s3://, gs://, ...)"),
    ],
)  # fmt: skip
def test_url_outputs_that_cannot_be_written_are_refused_and_nothing_is_created(
    checkpoints, tmp_path, capsys, monkeypatch, url, why
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, checkpoints / "k3-keras", "-o", url)
    assert (code, err) == (2, f"streamavg: error: {url}: {why}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url, why",
    [
        ("gs://bucket/run", "Please install gcsfs to access Google Storage"),
        ("az://bucket/run", "Install adlfs to access Azure Datalake Gen2 and Azure Blob Storage"),
    ],
)
def test_inputs_whose_protocol_package_is_missing_are_one_line(capsys, url, why):
    pytest.importorskip("upath")
    for package in ("gcsfs", "adlfs"):
        if importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed here")
    code, _, err = run(capsys, url)
    assert (code, err) == (2, f"streamavg: error: {url}: {why}\n")


def test_file_and_memory_urls_are_read_and_written_as_paths_are(checkpoints, tmp_path, capsys):
    """Protocols that need no network: `file://` is the local path, `memory://` fsspec's
    in-process store."""
    fsspec = pytest.importorskip("fsspec")
    local = tmp_path / "a.keras"
    assert run(capsys, checkpoints / "k3-keras", "-o", local, "-q")[0] == 0
    url = f"memory://streamavg/{tmp_path.name}/avg.keras"
    assert run(capsys, f"file://{checkpoints / 'k3-keras'}", "-o", url, "-q")[0] == 0
    assert fsspec.filesystem("memory").cat(url) == local.read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(
    checkpoints, tmp_path, capsys, kind
):
    import os
    import stat

    dest = tmp_path / "avg.keras"
    if kind == "fifo":
        os.mkfifo(dest)
    else:  # a character device like /dev/null; making one needs root
        try:
            os.mknod(dest, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
        except PermissionError:
            pytest.skip("making a device node needs root")
    before = os.stat(dest)
    got = run(capsys, checkpoints / "k3-keras", "-o", dest, "--overwrite")
    assert got == (
        2,
        got[1],
        f"streamavg: error: {dest}: is not a regular file (a device, FIFO or socket)\n",
    )
    after = os.stat(dest)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (
        before.st_ino,
        before.st_mode,
        before.st_rdev,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.keras"]


def test_an_existing_directory_as_output_gets_the_default_name(case_copy, tmp_path, capsys):
    d = case_copy("k3-keras")
    into = tmp_path / "into"
    into.mkdir()
    code, _, _ = run(capsys, d, "--scheme", "linear", "-q", "-o", into)
    assert code == 0
    assert sorted(p.name for p in into.iterdir()) == ["model_5.avg-linear-n5.keras"]
    code, _, _ = run(capsys, d, "-q", "-o", f"{tmp_path}/fresh/")
    assert code == 0
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["model_5.avg-equal-n5.keras"]


def test_one_file_is_one_file(checkpoints, tmp_path, capsys):
    newest = files(checkpoints / "k3-keras")[-1]
    code, stdout, _ = run(capsys, newest, "-q", "-o", tmp_path / "one.keras")
    assert code == 0 and stdout.startswith("averaged 1 file (equal) into ")


def test_default_output_leaves_out_the_newest_metric_value(checkpoints, tmp_path, capsys):
    """ModelCheckpoint("model-{val_loss:.2f}-{epoch:02d}.keras"): the metric describes the
    newest checkpoint, not the average, so the default name keeps only the epoch."""
    for i, path in enumerate(files(checkpoints / "k3-keras"), 1):
        shutil.copy(path, tmp_path / f"model-0.{60 - i}-{i:02d}.keras")
    assert run(capsys, tmp_path, "-q")[0] == 0
    assert [p.name for p in (tmp_path / "averaged").iterdir()] == ["model-05.avg-equal-n5.keras"]


def test_truncated_hdf5_is_rejected_before_any_output(case_copy, capsys):
    d = case_copy("k2-h5")
    victim = d / "model_03.h5"
    size = victim.stat().st_size
    truncate(victim)
    before = snapshot(d)
    assert run(capsys, d)[::2] == (
        1,
        f"streamavg: error: {victim}: corrupt HDF5 (truncated file: eof = {size // 2}, "
        f"sblock->base_addr = 0, stored_eof = {size})\n",
    )
    assert snapshot(d) == before


def test_chunked_compressed_checkpoints_average_like_contiguous_ones(case_copy, tmp_path, capsys):
    """Keras writes contiguous data, read straight from the file; other layouts go via h5py."""
    d = case_copy("k3-weights")
    packed = tmp_path / "packed"
    packed.mkdir()
    for p in files(d):
        with h5py.File(p) as src, h5py.File(packed / p.name, "w") as dst:
            for name in open_checkpoint(p, optimizer=True).tensors:
                data = src[name][()]
                chunked = {"chunks": data.shape, "compression": "gzip"} if data.ndim else {}
                dst.create_dataset(name, data=data, **chunked)
    a, b = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    assert run(capsys, d, "-o", a)[0] == run(capsys, packed, "-o", b)[0] == 0
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fb["layers/dense/vars/0"].compression == "gzip"
        for name in ("layers/dense/vars/0", "layers/dense_1/vars/1"):
            assert np.array_equal(fa[name][()], fb[name][()])


def test_explicit_weights_on_the_newest_reproduce_it(case_copy, tmp_path, capsys):
    d = case_copy("k3-keras")
    out = tmp_path / "avg.keras"
    assert run(capsys, d, "--weights", "0,0,0,0,2", "-o", out)[0] == 0
    with open_checkpoint(out) as avg, open_checkpoint(files(d)[-1]) as newest:
        assert json.loads(avg.h5.attrs["streamavg"])["weights"] == [0, 0, 0, 0, 1]
        for name in newest.tensors:
            assert np.array_equal(avg.h5[name][()], newest.h5[name][()]), name
    with zipfile.ZipFile(out) as a, zipfile.ZipFile(files(d)[-1]) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        for member in ("config.json", "metadata.json"):
            assert a.read(member) == b.read(member)
        assert a.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED


def test_progress_bar_on_a_terminal_only(checkpoints, tmp_path):
    """tqdm over bytes read on a terminal; nothing on a pipe (the other tests), or with -q."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    def stderr_on_a_terminal(*extra: str) -> str:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        out = tmp_path / f"avg{len(extra)}.keras"
        args = [sys.executable, "-m", "streamavg", str(checkpoints / "k3-keras"), "-o", str(out)]
        subprocess.run([*args, *extra], stderr=follower, stdout=subprocess.DEVNULL, check=True)
        os.close(follower)
        text = b""
        with suppress(OSError):  # EIO once the closed terminal is drained
            while chunk := os.read(leader, 1 << 16):
                text += chunk
        os.close(leader)
        return text.decode()

    shown = stderr_on_a_terminal()
    assert "averaging: 100%" in shown
    # Binary units, said so: the count, the total and the rate.
    assert re.search(r"\| \d+\.\d KiB/\d+\.\d KiB \[.*, \d+\.\d [KMGT]iB/s\]", shown), shown
    assert "kB" not in shown and "MB" not in shown
    assert stderr_on_a_terminal("-q") == ""


def test_checkpoints_in_epoch_folders_get_their_default_output_beside_the_folders(
    checkpoints, tmp_path, capsys, monkeypatch
):
    """`ckpts/epoch_5/model.keras`: the average goes to `ckpts/averaged/`, named for the
    newest's folder, not into the newest checkpoint's folder; a later scan leaves it out."""
    for i, path in enumerate(files(checkpoints / "k3-keras"), 1):
        (tmp_path / "ckpts" / f"epoch_{i}").mkdir(parents=True)
        shutil.copy(path, tmp_path / "ckpts" / f"epoch_{i}" / "model.keras")
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(capsys, "ckpts", "-q")
    out = Path("ckpts/averaged/epoch_5_model.avg-equal-n5.keras")
    assert (code, stdout.split(" in ")[0]) == (0, f"averaged 5 files (equal) into {out}")
    with open_checkpoint(out) as ck:
        sources = json.loads(ck.h5.attrs["streamavg"])["files"]
    assert sources == [f"epoch_{i}/model.keras" for i in range(1, 6)]
    code, _, err = run(capsys, "ckpts", "-q", "--dry-run", "--overwrite")
    assert (code, err) == (0, f"streamavg: note: left out {out}: an earlier streamavg output\n")


def test_inspect_refuses_a_fifo_and_a_directory_at_once(tmp_path, capsys):
    import os

    os.mkfifo(fifo := tmp_path / "model.keras")  # opening it would wait for a writer
    assert run(capsys, "inspect", fifo) == (
        1,
        "",
        f"streamavg: error: {fifo}: not a regular file (a device, FIFO or socket)\n",
    )
    assert run(capsys, "inspect", tmp_path) == (
        1,
        "",
        f"streamavg: error: {tmp_path}: is a directory, not a checkpoint\n",
    )
