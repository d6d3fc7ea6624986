"""select_checkpoints: which files, in which order, and the errors. Empty files suffice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamavg.errors import StreamavgError, UsageError
from streamavg.select import epoch_numbers, natural_key, parse_epochs, select_checkpoints


def touch(directory: Path, *names: str, mtime: int | None = None) -> list[Path]:
    paths = []
    for name in names:
        path = directory / name
        path.write_bytes(b"")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        paths.append(path)
    return paths


def names(inputs, **kwargs) -> list[str]:
    return [p.name for p in select_checkpoints(inputs, **kwargs).paths]


def error(exc_type: type[StreamavgError], message: str, inputs, **kwargs) -> None:
    """select_checkpoints(inputs, **kwargs) raises exactly `exc_type` with exactly `message`."""
    with pytest.raises(StreamavgError) as e:
        select_checkpoints(inputs, **kwargs)
    assert e.type is exc_type
    assert str(e.value) == message
    assert e.value.exit_code == {StreamavgError: 1, UsageError: 2}[exc_type]


@pytest.fixture
def epochs_dir(tmp_path: Path) -> Path:
    touch(tmp_path, *(f"model_{e}.keras" for e in range(480, 506)))
    return tmp_path


# -- which files, in which order ----------------------------------------------------------


def test_natural_order(tmp_path):
    touch(tmp_path, "model_100.keras", "model_10.keras", "model_9.keras")
    expected = ["model_9.keras", "model_10.keras", "model_100.keras"]
    assert sorted(reversed(expected), key=natural_key) == expected
    selection = select_checkpoints([tmp_path])
    assert selection.paths == tuple(tmp_path / n for n in expected)
    assert selection.by_mtime is False


def test_directory_scan_keeps_checkpoint_suffixes_only(tmp_path):
    touch(tmp_path, "d_4.weights.h5", "c_3.hdf5", "b_2.h5", "a_1.keras")
    touch(tmp_path, "notes.txt", "checkpoint.json", "model_5.keras.bak")
    (tmp_path / "sub").mkdir()
    touch(tmp_path / "sub", "e_5.keras")  # not recursive
    (tmp_path / "f_6.keras").mkdir()  # a directory, not a checkpoint
    assert names([tmp_path]) == ["a_1.keras", "b_2.h5", "c_3.hdf5", "d_4.weights.h5"]


def test_pattern(tmp_path):
    touch(tmp_path, "model_1.weights.h5", "model_2.weights.h5", "model_1.keras", "model_2.h5")
    assert names([tmp_path], pattern="*.weights.h5") == ["model_1.weights.h5", "model_2.weights.h5"]


def test_directory_and_files_mixed_and_deduplicated(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    touch(run, "model_1.keras", "model_2.keras", "model_3.keras")
    (extra,) = touch(other, "model_4.keras")
    again = run / "model_2.keras"
    roundabout = run / ".." / "run" / "model_3.keras"
    selection = select_checkpoints([str(again), run, extra, again, roundabout, run])
    assert [p.resolve() for p in selection.paths] == [
        (run / "model_1.keras").resolve(),
        (run / "model_2.keras").resolve(),
        (run / "model_3.keras").resolve(),
        extra.resolve(),
    ]


def test_last_keeps_newest_in_order(tmp_path):
    touch(tmp_path, *(f"model_{e}.keras" for e in range(1, 7)))
    assert names([tmp_path], last=3) == ["model_4.keras", "model_5.keras", "model_6.keras"]
    assert len(names([tmp_path], last=99)) == 6


# -- epochs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "first", "last"), [("490:499", 490, 499), ("495:", 495, 505), (":485", 480, 485)]
)
def test_epoch_range(epochs_dir, spec, first, last):
    assert names([epochs_dir], epochs=spec) == [f"model_{e}.keras" for e in range(first, last + 1)]


def test_epochs_then_last(epochs_dir):
    assert names([epochs_dir], epochs="490:499", last=3) == [
        "model_497.keras",
        "model_498.keras",
        "model_499.keras",
    ]


def test_model_checkpoint_names_use_the_epoch(tmp_path):
    touch(tmp_path, *(f"weights.{e:02d}-0.{40 - e}.h5" for e in range(8, 13)))
    assert names([tmp_path], epochs="9:11") == [
        "weights.09-0.31.h5",
        "weights.10-0.30.h5",
        "weights.11-0.29.h5",
    ]


def test_epoch_numbers():
    assert epoch_numbers(["weights.09-0.31.h5", "weights.10-0.30.h5"]) == [9, 10]
    assert epoch_numbers(["run3_epoch_9.keras", "run3_epoch_10.keras"]) == [9, 10]


@pytest.mark.parametrize(
    ("spec", "bounds"),
    [("490:499", (490, 499)), ("495:", (495, None)), (":485", (None, 485)), ("7:7", (7, 7))],
)
def test_parse_epochs(spec, bounds):
    assert parse_epochs(spec) == bounds


@pytest.mark.parametrize("spec", ["490", "a:b", "499:490", "1:2:3", ""])
def test_bad_epochs(epochs_dir, spec):
    message = f"--epochs wants FIRST:LAST, such as 490:499; got {spec!r}"
    error(UsageError, message, [epochs_dir], epochs=spec)


def test_epochs_matching_nothing(epochs_dir):
    message = f"{epochs_dir}: no checkpoint in epochs 600:700 (found 480..505)"
    error(StreamavgError, message, [epochs_dir], epochs="600:700")


def test_epochs_need_numbers(tmp_path):
    touch(tmp_path, "best.keras", "last.keras")
    error(UsageError, "--epochs needs an epoch number in every file name", [tmp_path], epochs="1:2")


# -- modification-time fallback -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5", ".weights.h5", ".hdf5"])
def test_names_without_numbers_use_mtime(tmp_path, suffix):
    """The "5" in ".h5" is no epoch number: these names carry none."""
    names = [f"final{suffix}", f"best{suffix}", f"last{suffix}"]
    for i, name in enumerate(names, start=1):
        touch(tmp_path, name, mtime=i * 1_000_000)
    selection = select_checkpoints([tmp_path])
    assert [p.name for p in selection.paths] == names
    assert selection.by_mtime is True


def test_numbered_names_ignore_mtime(tmp_path):
    touch(tmp_path, "model_2.keras", mtime=1_000_000)
    touch(tmp_path, "model_1.keras", mtime=2_000_000)
    selection = select_checkpoints([tmp_path])
    assert [p.name for p in selection.paths] == ["model_1.keras", "model_2.keras"]
    assert selection.by_mtime is False


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("last", [0, -1])
def test_last_must_be_positive(tmp_path, last):
    touch(tmp_path, "model_1.keras")
    error(UsageError, f"--last must be at least 1, got {last}", [tmp_path], last=last)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.keras"
    error(StreamavgError, f"{missing}: no such file or directory", [missing])


@pytest.mark.parametrize("contents", [(), ("notes.txt", "checkpoint.json")])
def test_directory_without_checkpoints(tmp_path, contents):
    touch(tmp_path, *contents)
    error(StreamavgError, f"{tmp_path}: no checkpoint (*.keras, *.h5 or *.hdf5)", [tmp_path])


def test_pattern_matching_nothing(tmp_path):
    touch(tmp_path, "model_1.keras")
    message = f"{tmp_path}: no checkpoint matches '*.weights.h5'"
    error(StreamavgError, message, [tmp_path], pattern="*.weights.h5")


def test_no_inputs():
    error(UsageError, "no checkpoints given", [])
