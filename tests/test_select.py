"""select_checkpoints: which files, in which order, and the errors. Empty files suffice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamavg.errors import StreamavgError, UsageError
from streamavg.select import KINDS, natural_key, parse_epochs, select_checkpoints


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
    touch(tmp_path, "m_4.weights.h5", "m_3.hdf5", "m_2.h5", "m_1.keras")
    touch(tmp_path, "notes.txt", "checkpoint.json", "m_5.keras.bak")
    (tmp_path / "sub").mkdir()
    touch(tmp_path / "sub", "m_5.keras")  # not recursive while there are checkpoints here
    (tmp_path / "m_6.keras").mkdir()  # a directory, not a checkpoint
    assert names([tmp_path]) == ["m_1.keras", "m_2.h5", "m_3.hdf5", "m_4.weights.h5"]


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
    assert select_checkpoints([tmp_path], last=3).notes == ()
    assert len(names([tmp_path], last=99)) == 6
    assert select_checkpoints([tmp_path], last=10).notes == (
        "last=10: only 6 checkpoints to choose from, all taken",
    )


def test_a_symbolic_link_loop_is_one_line(tmp_path):
    touch(tmp_path, "model_1.keras")
    os.symlink(tmp_path / "model_2.keras", tmp_path / "model_2.keras")
    error(StreamavgError, f"{tmp_path / 'model_2.keras'}: a symbolic link loop", [tmp_path])


@pytest.mark.parametrize("path", ["/proc/self/status", "/dev/null"])
def test_a_named_path_that_is_no_checkpoint_is_refused(tmp_path, path):
    touch(tmp_path, "model_1.keras")
    why = {
        "/proc/self/status": "not a checkpoint (neither HDF5, .keras nor safetensors)",
        "/dev/null": "not a regular file (a device, FIFO or socket)",
    }[path]
    error(StreamavgError, f"{path}: {why}", [tmp_path / "model_1.keras", path])


def trainer_folder(folder: Path, *names: str) -> Path:
    """A checkpoint folder as a Trainer leaves it, with `names` (empty files) beside config."""
    folder.mkdir(parents=True)
    touch(folder, "config.json", *names)
    return folder


def test_checkpoint_folders_still_being_written_are_left_out_with_a_note(tmp_path):
    for step in (100, 200):
        trainer_folder(tmp_path / f"checkpoint-{step}", "model.safetensors", "optimizer.pt")
    trainer_folder(tmp_path / "checkpoint-300", "optimizer.pt")
    trainer_folder(tmp_path / "checkpoint-400", "model-00001-of-00002.safetensors")
    sel = select_checkpoints([tmp_path])
    assert [p.name for p in sel.paths] == ["checkpoint-100", "checkpoint-200"]
    assert sel.notes == (
        f"left out {tmp_path / 'checkpoint-300'}: no weights file (only config.json, "
        "optimizer.pt): still being written?",
        f"left out {tmp_path / 'checkpoint-400'}: holds shards "
        "(model-00001-of-00002.safetensors, ...) but no index: still being written?",
    )
    error(
        StreamavgError,
        f"{tmp_path / 'checkpoint-300'}: no weights file (only config.json, optimizer.pt): "
        "still being written?",
        [tmp_path / "checkpoint-300"],
    )


def test_a_shard_without_its_index_is_never_taken_alone(tmp_path):
    touch(tmp_path, "model-00001-of-00002.safetensors", "step_1.safetensors", "step_2.safetensors")
    sel = select_checkpoints([tmp_path])
    assert [p.name for p in sel.paths] == ["step_1.safetensors", "step_2.safetensors"]
    assert sel.notes == (
        f"left out {tmp_path / 'model-00001-of-00002.safetensors'}: a shard, but no index "
        "lists it: still being written?",
    )


def test_a_run_folder_with_its_final_model_averages_its_checkpoint_folders(tmp_path):
    run = trainer_folder(tmp_path / "run", "model.safetensors", "training_args.bin")
    for step in (2, 4, 10):
        trainer_folder(run / f"checkpoint-{step}", "model.safetensors")
    sel = select_checkpoints([run], last=2)
    assert [p.name for p in sel.paths] == ["checkpoint-4", "checkpoint-10"]
    assert sel.notes == (
        f"{run}: averaging the checkpoint folders in it (checkpoint-10, ...), not the model "
        "saved in the folder itself (name the folders to choose otherwise)",
    )
    assert names([run], pattern="checkpoint-1*") == ["checkpoint-10"]


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


def epochs_of(directory: Path, *files: str, within: range = range(1, 13)) -> list[int]:
    """The epoch that `epochs="E:E"` finds in each of `files` (made empty in `directory`)."""
    touch(directory, *files)

    def only(e: int) -> list[str]:
        try:
            return names([directory], epochs=f"{e}:{e}")
        except StreamavgError:  # no checkpoint in that epoch
            return []

    return [e for name in files for e in within if only(e) == [name]]


def test_epoch_numbers(tmp_path):
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    assert epochs_of(a, "weights.09-0.31.h5", "weights.10-0.30.h5") == [9, 10]
    assert epochs_of(b, "run3_epoch_9.keras", "run3_epoch_10.keras") == [9, 10]


@pytest.mark.parametrize(
    ("spec", "bounds"),
    [("490:499", (490, 499)), ("495:", (495, None)), (":485", (None, 485)), ("7:7", (7, 7))],
)
def test_parse_epochs(spec, bounds):
    assert parse_epochs(spec) == bounds


@pytest.mark.parametrize("spec", ["490", "a:b", "499:490", "1:2:3", ""])
def test_bad_epochs(epochs_dir, spec):
    message = f"epochs wants FIRST:LAST, such as 490:499; got {spec!r}"
    error(UsageError, message, [epochs_dir], epochs=spec)


def test_epochs_matching_nothing(epochs_dir):
    message = f"{epochs_dir}: no checkpoint in epochs 600:700 (found 480..505)"
    error(StreamavgError, message, [epochs_dir], epochs="600:700")


def test_epochs_need_numbers(tmp_path):
    touch(tmp_path, "best.keras", "last.keras")
    error(UsageError, "epochs needs an epoch number in every file name", [tmp_path], epochs="1:2")


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
    error(UsageError, f"last must be at least 1, got {last}", [tmp_path], last=last)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.keras"
    error(StreamavgError, f"{missing}: no such file or directory", [missing])


@pytest.mark.parametrize("contents", [(), ("notes.txt", "checkpoint.json")])
def test_directory_without_checkpoints(tmp_path, contents):
    touch(tmp_path, *contents)
    error(StreamavgError, f"{tmp_path}: no checkpoint {KINDS}", [tmp_path])


def test_pattern_matching_nothing(tmp_path):
    touch(tmp_path, "model_1.keras")
    message = f"{tmp_path}: no checkpoint matches '*.weights.h5'"
    error(StreamavgError, message, [tmp_path], pattern="*.weights.h5")


def test_no_inputs():
    error(UsageError, "no checkpoints given", [])


# -- names as ModelCheckpoint writes them: metric values are never epochs ------------------


def selection(inputs, **kwargs):
    return select_checkpoints(inputs, **kwargs)


METRIC_FIRST = ["model-0.61-08", "model-0.55-09", "model-0.58-10", "model-0.47-11", "model-1.02-12"]


def test_metric_before_the_epoch(tmp_path):
    """`model-{val_loss:.2f}-{epoch:02d}.keras`: ordered by epoch, not by the loss's digits."""
    touch(tmp_path, *(f"{n}.keras" for n in reversed(METRIC_FIRST)))
    assert names([tmp_path]) == [f"{n}.keras" for n in METRIC_FIRST]
    assert names([tmp_path], last=2) == ["model-0.47-11.keras", "model-1.02-12.keras"]
    assert names([tmp_path], epochs="9:10") == ["model-0.55-09.keras", "model-0.58-10.keras"]


def test_every_way_python_writes_a_float(tmp_path):
    """`model_{val_loss:.4f}_ep{epoch}`, and unformatted values: exponents, signs, nan, inf."""
    written = ["model_0.5312_ep1", "model_1.2e-05_ep2", "model_-0.3100_ep3", "model_inf_ep4"]
    written += ["model_nan_ep10", "model_1e+20_ep11"]
    touch(tmp_path, *(f"{n}.weights.h5" for n in written))
    assert names([tmp_path]) == [f"{n}.weights.h5" for n in written]
    assert names([tmp_path], epochs="4:10") == [
        "model_inf_ep4.weights.h5",
        "model_nan_ep10.weights.h5",
    ]


def test_dots_between_epoch_and_metric(tmp_path):
    """`weights.{epoch:02d}.{val_loss:.2f}`: 03.0.53 is epoch 3 (Python writes no 03.0), so
    10.0.49, which reads both ways, is epoch 10 like them."""
    touch(tmp_path, "weights.10.0.49.h5", "weights.03.0.53.h5", "weights.04.1.51.h5")
    assert names([tmp_path]) == ["weights.03.0.53.h5", "weights.04.1.51.h5", "weights.10.0.49.h5"]


def test_digits_that_read_either_way_are_refused(tmp_path):
    """`model.3.0.53`: epoch 3 and 0.53, or 3.0 and epoch 53; a template tells."""
    (path, *_) = touch(tmp_path, "model.3.0.53.keras", "model.4.0.51.keras")
    message = (
        f"{path}: cannot tell which of the numbers in its name is the epoch; "
        "pass template (the ModelCheckpoint filepath)"
    )
    error(StreamavgError, message, [tmp_path])
    got = names([tmp_path], template="model.{epoch}.{val_loss:.2f}.keras")
    assert got == ["model.3.0.53.keras", "model.4.0.51.keras"]


def test_epoch_numbers_skip_metrics(tmp_path):
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    assert epochs_of(a, "model-0.61-08.keras", "model-0.55-09.keras") == [8, 9]
    assert epochs_of(b, "ckpt_1.2e-05_3.h5", "ckpt_nan_4.h5") == [3, 4]


def test_save_best_only_file_beside_epochs_is_left_out(tmp_path):
    scores, best = touch(tmp_path, "best-0.53.keras", "best.keras")
    touch(tmp_path, "model_1.keras", "model_2.keras")
    sel = selection([tmp_path])
    assert [p.name for p in sel.paths] == ["model_1.keras", "model_2.keras"]
    assert sel.notes == (
        f"left out {scores}, {best}: no epoch number in the name, unlike the other checkpoints",
    )
    assert sel.by_mtime is False


def test_same_epoch_twice_is_refused(tmp_path):
    four, padded = touch(tmp_path, "model_4.keras", "model_04.keras")
    touch(tmp_path, "model_3.keras")
    error(StreamavgError, f"{padded} and {four} are both epoch 4; keep one of them", [tmp_path])


def test_copy_elsewhere_claiming_the_same_epoch_is_refused(tmp_path):
    (run := tmp_path / "run").mkdir()
    (backup := tmp_path / "backup").mkdir()
    (original, _) = touch(run, "model_4.keras", "model_5.keras")
    (copy,) = touch(backup, "model_4.keras")
    message = f"{copy} and {original} are both epoch 4; keep one of them"
    error(StreamavgError, message, [run, copy])


def test_one_file_reached_twice_counts_once(tmp_path):
    (original,) = touch(tmp_path, "model_1.keras")
    roundabout = tmp_path / ".." / tmp_path.name / "model_1.keras"
    assert names([tmp_path, original, roundabout]) == ["model_1.keras"]


def test_hard_links_are_checkpoints_of_their_own(tmp_path):
    """A backup tool links identical files: two epochs that happen to hold the same bytes."""
    (original,) = touch(tmp_path, "model_1.keras")
    os.link(original, tmp_path / "model_2.keras")
    assert names([tmp_path]) == ["model_1.keras", "model_2.keras"]
    os.link(original, tmp_path / "model_01.keras")
    message = f"{tmp_path}/model_01.keras and {original} are both epoch 1; keep one of them"
    error(StreamavgError, message, [tmp_path])


def test_http_fifos_and_devices_are_refused_at_once(tmp_path):
    message = (
        "https://x.org/ckpts: HTTP cannot list folders; use object storage (s3://, gs://, ...)"
    )
    error(UsageError, message, ["https://x.org/ckpts"])
    os.mkfifo(tmp_path / "model_1.keras")  # opening it for reading would wait for a writer
    error(
        StreamavgError,
        f"{tmp_path}/model_1.keras: not a regular file (a device, FIFO or socket)",
        [tmp_path / "model_1.keras"],
    )
    error(StreamavgError, "/dev/null: not a regular file (a device, FIFO or socket)", ["/dev/null"])


def test_names_of_different_kinds_are_refused(tmp_path):
    ckpt, model, _ = touch(tmp_path, "ckpt-3.keras", "model_1.keras", "model_2.keras")
    message = (
        f"checkpoint names of different kinds, such as {ckpt} and {model}; "
        "choose one kind with pattern or template"
    )
    error(StreamavgError, message, [tmp_path])
    assert names([tmp_path], pattern="model_*") == ["model_1.keras", "model_2.keras"]


@pytest.fixture
def epoch_dirs(tmp_path: Path) -> Path:
    """Unzipped `.keras` models in folders named by epoch: `epoch_{epoch}/model.weights.h5`
    beside `config.json`."""
    for epoch in (10, 9, 11):
        (tmp_path / f"epoch_{epoch}").mkdir()
        touch(tmp_path / f"epoch_{epoch}", "model.weights.h5", "config.json")
    return tmp_path


def test_directories_named_by_epoch(epoch_dirs):
    """The folders are the checkpoints, found or named; their weights files named alone
    are taken as weights files, in the folders' order."""
    folders = [epoch_dirs / f"epoch_{e}" for e in (9, 10, 11)]
    as_files = sorted(epoch_dirs.glob("*/model.weights.h5"))  # ckpts/*/model.weights.h5
    as_dirs = sorted(epoch_dirs.glob("epoch_*"))  # ckpts/epoch_*
    for inputs, want in [
        (as_files, [f / "model.weights.h5" for f in folders]),
        (as_dirs, folders),
        ([epoch_dirs], folders),
    ]:
        sel = selection(inputs)
        assert sel.paths == tuple(want)
        assert (sel.by_mtime, sel.notes) == (False, ())
    assert selection([epoch_dirs], epochs="10:").paths == tuple(folders[1:])


# -- templates ----------------------------------------------------------------------------


def test_template_orders_and_leaves_out_other_names(tmp_path):
    touch(tmp_path, "ckpt.10-0.30.keras", "ckpt.02-0.51.keras", "ckpt.09-0.33.keras")
    best, other = touch(tmp_path, "best.keras", "ckpt.09.keras")
    sel = selection([tmp_path], template="ckpt.{epoch:02d}-{val_loss:.2f}.keras")
    assert [p.name for p in sel.paths] == [
        "ckpt.02-0.51.keras",
        "ckpt.09-0.33.keras",
        "ckpt.10-0.30.keras",
    ]
    template = "template='ckpt.{epoch:02d}-{val_loss:.2f}.keras'"
    assert sel.notes == (f"left out {best}, {other}: not named like {template}",)


def test_template_with_directories_and_batches(tmp_path):
    for epoch, batch in [(2, 4), (1, 8), (2, 8), (1, 4)]:
        (tmp_path / f"e{epoch}").mkdir(exist_ok=True)
        touch(tmp_path / f"e{epoch}", f"b{batch}.keras")
    got = [
        str(p.relative_to(tmp_path))
        for p in selection([*tmp_path.glob("*/*")], template="e{epoch}/b{batch}.keras").paths
    ]
    assert got == ["e1/b4.keras", "e1/b8.keras", "e2/b4.keras", "e2/b8.keras"]


@pytest.mark.parametrize(
    ("template", "why"),
    [
        (
            "best-{val_loss:.2f}.keras",
            "needs an {epoch} or {batch} field to order the checkpoints by",
        ),
        ("model_{0}.keras", "{0} is not a plain field (such as {epoch:02d})"),
        ("model_{epoch!r}.keras", "{epoch} is not a plain field (such as {epoch:02d})"),
        ("model_{epoch.keras", "expected '}' before end of string"),
    ],
)
def test_bad_templates(tmp_path, template, why):
    touch(tmp_path, "model_1.keras")
    error(UsageError, f"template={template!r}: {why}", [tmp_path], template=template)


def test_template_matching_nothing(tmp_path):
    (first, _) = touch(tmp_path, "a_1.keras", "a_2.keras")
    message = f"no checkpoint is named like template='b_{{epoch}}.keras' (such as {first})"
    error(StreamavgError, message, [tmp_path], template="b_{epoch}.keras")


def test_epochs_need_an_epoch_field(tmp_path):
    touch(tmp_path, "model_1.keras")
    message = "epochs needs an {epoch} field in template"
    error(UsageError, message, [tmp_path], template="model_{batch}.keras", epochs="1:2")


# -- the best K by a monitored metric -----------------------------------------------------


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    losses = {1: "0.90", 2: "0.40", 3: "nan", 4: "0.35", 5: "0.60", 6: "0.38"}
    touch(tmp_path, *(f"ckpt-{e:02d}-{loss}.keras" for e, loss in losses.items()))
    return tmp_path


TEMPLATE = "ckpt-{epoch:02d}-{val_loss:.2f}.keras"


def test_best_by_template_field(scored):
    sel = selection([scored], template=TEMPLATE, best=3, monitor="val_loss")
    assert [p.name for p in sel.paths] == [
        "ckpt-02-0.40.keras",
        "ckpt-04-0.35.keras",
        "ckpt-06-0.38.keras",
    ]
    assert sel.values == (0.40, 0.35, 0.38)
    worst = selection([scored], template=TEMPLATE, best=2, monitor="val_loss", mode="max")
    assert worst.values == (0.90, 0.60)  # nan ranks last either way


def test_epochs_then_best_then_last(scored):
    sel = selection([scored], template=TEMPLATE, epochs="2:5", best=3, monitor="val_loss", last=2)
    assert [p.name for p in sel.paths] == ["ckpt-04-0.35.keras", "ckpt-05-0.60.keras"]


@pytest.mark.parametrize(
    ("kwargs", "exc_type", "message"),
    [
        ({"best": 2}, UsageError, "best needs monitor"),
        ({"best": 0, "monitor": "val_loss"}, UsageError, "best must be at least 1, got 0"),
        ({"monitor": "val_loss"}, UsageError, "monitor needs best"),
        ({"log": "log.csv"}, UsageError, "log needs best"),
        ({"mode": "max"}, UsageError, "mode needs best"),
        (
            {"best": 2, "monitor": "val_auc"},
            UsageError,
            "monitor='val_auc': no values to rank by; pass log (a CSVLogger file) "
            "or a template with {val_auc}",
        ),
        (
            {"best": 2, "monitor": "val_loss", "template": TEMPLATE, "mode": "up"},
            UsageError,
            "mode must be auto, min or max, got 'up'",
        ),
        (
            {
                "best": 2,
                "monitor": "val_score",
                "template": "ckpt-{epoch:02d}-{val_score:.2f}.keras",
            },
            UsageError,
            "monitor='val_score': cannot tell whether higher or lower is better; "
            "pass mode='max' or mode='min'",
        ),
    ],
)
def test_bad_ranking(scored, kwargs, exc_type, message):
    error(exc_type, message, [scored], **kwargs)


# -- CSVLogger files ----------------------------------------------------------------------


def csv_log(path: Path, *rows: str, header: str = "epoch,loss,val_loss") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_log_rows_are_epochs_counted_from_zero(tmp_path):
    touch(tmp_path, "model_1.keras", "model_2.keras", "model_3.keras")
    log = csv_log(tmp_path / "log.csv", "0,1.0,0.9", "1,0.8,0.5", "2,0.7,0.6")
    sel = selection([tmp_path], best=2, monitor="val_loss", log=log)
    assert [p.name for p in sel.paths] == ["model_2.keras", "model_3.keras"]
    assert sel.values == (0.5, 0.6)


def test_log_appended_after_a_resumed_run_takes_the_last_row(tmp_path):
    touch(tmp_path, "model_1.keras", "model_2.keras", "model_3.keras")
    rows = ["0,1.0,0.9", "1,0.8,0.1", "1,0.8,0.95", "2,0.7,0.6"]  # epoch 2 run again
    log = csv_log(tmp_path / "log.csv", *rows)
    sel = selection([tmp_path], best=1, monitor="val_loss", log=log)
    assert (sel.paths, sel.values) == ((tmp_path / "model_3.keras",), (0.6,))


def test_log_with_another_separator_and_nan(tmp_path):
    touch(tmp_path, "model_1.keras", "model_2.keras")
    log = csv_log(
        tmp_path / "log.csv", "0;0.5;nan", "1;0.6;0.7", header="epoch;accuracy;val_accuracy"
    )
    sel = selection([tmp_path], best=1, monitor="val_accuracy", log=log)
    assert sel.values == (0.7,)


def test_log_missing_a_row(tmp_path):
    (_, second) = touch(tmp_path, "model_1.keras", "model_2.keras")
    log = csv_log(tmp_path / "log.csv", "0,1.0,0.9", "1,0.8,NA")
    message = f"{log}: no val_loss for {second} (epoch 2, which CSVLogger writes as epoch 1)"
    error(StreamavgError, message, [tmp_path], best=1, monitor="val_loss", log=log)


@pytest.mark.parametrize(
    ("text", "exc_type", "message"),
    [
        (
            "loss,val_loss\n1,2\n",
            StreamavgError,
            "{log}: not a CSVLogger file (no 'epoch' column first)",
        ),
        (
            "epoch,loss\n0,1\n",
            UsageError,
            "monitor='val_loss': not logged in {log} (columns: loss)",
        ),
        (
            "epoch,val_loss\nepoch,val_loss\n",
            StreamavgError,
            "{log}: line 2 is not a CSVLogger row",
        ),
    ],
)
def test_bad_logs(tmp_path, text, exc_type, message):
    touch(tmp_path, "model_1.keras")
    (log := tmp_path / "log.csv").write_text(text)
    error(exc_type, message.format(log=log), [tmp_path], best=1, monitor="val_loss", log=log)


def test_log_cannot_rank_batch_checkpoints(tmp_path):
    a, b = touch(tmp_path, "model_2_4.keras", "model_2_8.keras")
    touch(tmp_path, "model_1_8.keras")
    log = csv_log(tmp_path / "log.csv", "0,1.0,0.9", "1,0.8,0.5")
    message = f"{log} has one row per epoch, but {a} and {b} are both epoch 2"
    error(StreamavgError, message, [tmp_path], best=1, monitor="val_loss", log=log)
    message = (
        f"{log} has one row per epoch, but the checkpoints were saved within epochs "
        "({batch} in template); rank them by a field of the template"
    )
    kwargs = {
        "best": 1,
        "monitor": "val_loss",
        "log": log,
        "template": "model_{epoch}_{batch}.keras",
    }
    error(UsageError, message, [tmp_path], **kwargs)


def test_log_needs_epoch_numbers(tmp_path):
    touch(tmp_path, "first.keras", "second.keras")
    log = csv_log(tmp_path / "log.csv", "0,1.0,0.9")
    message = "log needs an epoch number in every file name"
    error(UsageError, message, [tmp_path], best=1, monitor="val_loss", log=log)


# -- earlier streamavg outputs ------------------------------------------------------------


def averaged(path: Path) -> Path:
    """A file that carries streamavg's provenance, as its outputs do."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["streamavg"] = "{}"
    return path


def test_earlier_output_found_in_a_directory_is_left_out(tmp_path):
    touch(tmp_path, "model_1.weights.h5", "model_2.weights.h5")
    output = averaged(tmp_path / "model_2.avg-equal-n2.weights.h5")
    sel = selection([tmp_path])
    assert [p.name for p in sel.paths] == ["model_1.weights.h5", "model_2.weights.h5"]
    assert sel.notes == (f"left out {output}: an earlier streamavg output",)


def test_earlier_output_named_among_checkpoints_is_left_out(tmp_path):
    """As a shell glob such as `ckpts/*` names it: left out with a note, never averaged."""
    ckpts = touch(tmp_path, "model_1.weights.h5", "model_2.weights.h5")
    output = averaged(tmp_path / "model_9.weights.h5")
    for inputs in (sorted(tmp_path.iterdir()), [tmp_path, output]):
        sel = selection(inputs)
        assert sel.paths == tuple(ckpts)
        assert sel.notes == (f"left out {output}: an earlier streamavg output",)


def test_outputs_named_alone_are_averaged(tmp_path):
    a = averaged(tmp_path / "run_1.weights.h5")
    b = averaged(tmp_path / "run_2.weights.h5")
    sel = selection([b, a])
    assert (sel.paths, sel.notes) == ((a, b), ())


def test_directory_of_outputs_only(tmp_path):
    a = averaged(tmp_path / "run_1.weights.h5")
    message = f"only earlier streamavg outputs found ({a}); name them as files to average them"
    error(StreamavgError, message, [tmp_path])


# -- found in review: percent metrics, shadowed folders, one file, FIFOs, typos ------------


def test_percent_metrics_are_never_epochs(tmp_path):
    """ModelCheckpoint("model-{val_accuracy:.0%}-{epoch:02d}.keras") writes `model-62%-01`."""
    accuracy = {1: 62, 2: 75, 3: 71, 4: 80, 5: 78, 6: 69}
    touch(tmp_path, *(f"model-{a}%-{e:02d}.keras" for e, a in accuracy.items()))
    assert names([tmp_path], last=2) == ["model-78%-05.keras", "model-69%-06.keras"]
    assert names([tmp_path], epochs="3:4") == ["model-71%-03.keras", "model-80%-04.keras"]


def test_folders_beside_checkpoints_are_named_in_a_note(tmp_path):
    """A final `model.keras` beside `epoch_N/model.keras` folders: the folders are not taken,
    and the note says so, as it says that one checkpoint is a copy, not an average."""
    (final,) = touch(tmp_path, "model.keras")
    for epoch in (1, 2, 3, 4):
        (tmp_path / f"epoch_{epoch}").mkdir()
        touch(tmp_path / f"epoch_{epoch}", "model.keras")
    sel = selection([tmp_path])
    assert sel.paths == (final,)
    folders = ", ".join(str(tmp_path / f"epoch_{e}") for e in (1, 2, 3))
    assert sel.notes == (
        f"left out 4 checkpoints in {folders}, ...: in folders below {tmp_path}, beside the "
        "checkpoints in it (name the folders to take them instead)",
        f"only one checkpoint, {final}: the average is a copy of it",
    )
    shown = selection([tmp_path / f"epoch_{e}" for e in (1, 2, 3, 4)])
    assert [p.parent.name for p in shown.paths] == ["epoch_1", "epoch_2", "epoch_3", "epoch_4"]
    assert shown.notes == ()


def test_a_fifo_as_log_is_refused_at_once(tmp_path):
    touch(tmp_path, "model_1.keras", "model_2.keras")
    os.mkfifo(fifo := tmp_path / "log.csv")  # reading it would wait for a writer forever
    message = f"{fifo}: not a regular file (a device, FIFO or socket)"
    error(StreamavgError, message, [tmp_path], best=1, monitor="val_loss", log=fifo)


def test_a_monitor_missing_from_the_log_is_named_before_its_direction(tmp_path):
    touch(tmp_path, "model_1.keras", "model_2.keras")
    log = csv_log(tmp_path / "log.csv", "0,1.0,0.9", "1,0.8,0.5")
    message = f"monitor='val_los': not logged in {log} (columns: loss, val_loss)"
    error(UsageError, message, [tmp_path], best=1, monitor="val_los", log=log)


def test_a_scan_looks_for_every_file_container():
    """Each adapter's file names are among those a directory scan takes."""
    from streamavg.formats import ACCEPTED
    from streamavg.names import CHECKPOINT_SUFFIXES

    for fmt, suffixes in ACCEPTED.items():
        for suffix in suffixes:
            assert suffix.endswith(CHECKPOINT_SUFFIXES), (fmt, suffix)


def test_a_config_beside_checkpoint_files_is_no_checkpoint_being_written(tmp_path):
    touch(tmp_path, "config.json", "step_1.safetensors", "step_2.safetensors")
    sel = select_checkpoints([tmp_path])
    assert [p.name for p in sel.paths] == ["step_1.safetensors", "step_2.safetensors"]
    assert sel.notes == ()
