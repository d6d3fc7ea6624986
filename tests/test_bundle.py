"""Checkpoint folders as loaders take them: which files are averaged, compared, copied, left
out or refused (real checkpoints from the tools are in test_hub.py; these are small
folders of real safetensors files, for the rules at their edges)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from safetensors.numpy import load_file, save_file

from streamavg.cli import main

STEPS = (10, 20, 30)


def folder(root: Path, step: int, **files: bytes) -> Path:
    """`root/checkpoint-STEP/`: a model.safetensors of its own values, a config, `files`."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": np.full(4, step, np.float32)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "x", "transformers_version": "5"}))
    for name, data in files.items():
        (path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (path / name.replace("__", "/")).write_bytes(data)
    return path


def run(capsys, *args: object) -> tuple[int, str]:
    code = main([*map(str, args), "-q"])
    return code, capsys.readouterr().err


def test_companions_copied_state_left_out_and_the_weights_averaged(tmp_path, capsys):
    for step in STEPS:
        version = json.dumps({"model_type": "x", "transformers_version": f"5.{step}"})
        folder(
            tmp_path / "run",
            step,
            **{"tokenizer.json": b"{}", "optimizer.pt": b"state", "global_step9__x.pt": b"s"},
        ).joinpath("config.json").write_text(version)  # versions differ: still one model
    out = tmp_path / "avg"
    before = snapshot(tmp_path / "run")
    assert run(capsys, tmp_path / "run", "-o", out) == (0, "")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    np.testing.assert_array_equal(load_file(out / "model.safetensors")["w"], np.full(4, 20.0))
    newest = tmp_path / "run" / "checkpoint-30"
    assert (out / "config.json").read_bytes() == (newest / "config.json").read_bytes()
    assert snapshot(tmp_path / "run") == before
    kept = tmp_path / "kept"
    assert run(capsys, tmp_path / "run", "-o", kept, "--optimizer", "newest") == (0, "")
    assert (kept / "optimizer.pt").read_bytes() == b"state"
    assert (kept / "global_step9" / "x.pt").read_bytes() == b"s"


def test_a_different_tokenizer_is_refused_or_taken_from_the_newest(tmp_path, capsys):
    for step in STEPS:
        folder(tmp_path / "run", step, **{"vocab.txt": b"a\nb\n" if step < 30 else b"a\nc\n"})
    code, err = run(capsys, tmp_path / "run", "-o", tmp_path / "avg")
    oldest, newest = (tmp_path / "run" / f"checkpoint-{s}" for s in (10, 30))
    assert (code, err) == (
        1,
        f"streamavg: error: {oldest}: vocab.txt: differs from byte 2 (in {newest}); the "
        "weights would be averaged across different models (pass --companions newest to "
        "take the newest's)\n",
    )
    assert not (tmp_path / "avg").exists()
    code, err = run(capsys, tmp_path / "run", "-o", tmp_path / "avg", "--companions", "newest")
    assert (code, err) == (
        0,
        f"streamavg: note: vocab.txt differs in {oldest}: taken from the newest, {newest}\n",
    )
    assert (tmp_path / "avg" / "vocab.txt").read_bytes() == b"a\nc\n"


def test_a_different_model_config_is_refused_naming_the_key(tmp_path, capsys):
    for step in STEPS:
        path = folder(tmp_path / "run", step)
        act = "gelu" if step == 10 else "relu"
        (path / "config.json").write_text(json.dumps({"model_type": "x", "hidden_act": act}))
    code, err = run(capsys, tmp_path / "run", "-o", tmp_path / "avg")
    oldest, newest = (tmp_path / "run" / f"checkpoint-{s}" for s in (10, 30))
    assert (code, err) == (
        1,
        f'streamavg: error: {oldest}: config.json: hidden_act is "gelu" here, "relu" (in '
        f"{newest}); the weights would be averaged across different models (pass "
        "--companions newest to take the newest's)\n",
    )


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.ckpt", "extra/weights.h5"])
def test_a_weights_file_that_cannot_be_averaged_is_refused_never_copied(tmp_path, capsys, name):
    for step in STEPS:
        folder(tmp_path / "run", step, **{name.replace("/", "__"): b"\x80\x04pickle"})
    code, err = run(capsys, tmp_path / "run", "-o", tmp_path / "avg")
    assert (code, err) == (
        1,
        f"streamavg: error: {tmp_path / 'run' / 'checkpoint-30' / name}: a weights file that "
        "streamavg cannot average (it reads .safetensors and Keras's .weights.h5 and "
        ".weights.json; pickles are never unpickled), and would not copy from the newest\n",
    )
    assert not (tmp_path / "avg").exists()


def test_a_folder_of_pickled_weights_alone_is_refused(tmp_path, capsys):
    path = tmp_path / "checkpoint-1"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    code, err = run(capsys, path)
    assert code == 1
    assert err.startswith(f"streamavg: error: {path / 'pytorch_model.bin'}: a weights file")


def accelerate_state(path: Path, step: int, models: int) -> Path:
    """What `accelerator.save_state(path)` writes: model.safetensors (model_1... for more
    models), optimizer.bin, scheduler.bin and random_states_0.pkl."""
    path.mkdir(parents=True)
    for k in range(models):
        name = "model.safetensors" if k == 0 else f"model_{k}.safetensors"
        save_file({"w": np.full(2, step + k, np.float32)}, path / name)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (path / name).write_bytes(b"state")
    return path


def test_accelerate_states_of_one_model_average_of_several_are_refused(tmp_path, capsys):
    for step in STEPS:
        accelerate_state(tmp_path / "one" / f"checkpoint_{step}", step, 1)
        accelerate_state(tmp_path / "two" / f"checkpoint_{step}", step, 2)
    assert run(capsys, tmp_path / "one", "-o", tmp_path / "avg") == (0, "")
    assert sorted(p.name for p in (tmp_path / "avg").iterdir()) == ["model.safetensors"]
    np.testing.assert_array_equal(
        load_file(tmp_path / "avg" / "model.safetensors")["w"], np.full(2, 20.0)
    )
    code, err = run(capsys, tmp_path / "two", "-o", tmp_path / "avg2")
    newest = tmp_path / "two" / "checkpoint_30"  # opened first, for its format
    assert (code, err) == (
        1,
        f"streamavg: error: {newest}: holds 2 models (model.safetensors, model_1.safetensors: "
        "accelerate.save_state); average one model at a time, with --pattern "
        "'*/model.safetensors' on the folder above\n",
    )
    code, err = run(
        capsys,
        tmp_path / "two",
        "--pattern",
        "*/model_1.safetensors",
        "-o",
        tmp_path / "m1.safetensors",
    )
    assert (code, err) == (0, "")
    np.testing.assert_array_equal(load_file(tmp_path / "m1.safetensors")["w"], np.full(2, 21.0))


def test_inspect_lists_a_folders_weights_files_and_companions(tmp_path, capsys):
    path = folder(tmp_path, 1, **{"tokenizer.json": b"{}", "optimizer.pt": b"state"})
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    size = (path / "model.safetensors").stat().st_size
    assert lines[:3] == [
        f"{path}: huggingface, 1 tensor, 16 bytes ({size:,} bytes on disk)",
        "weights files: model.safetensors",
        "with them: config.json, tokenizer.json",
    ]


def test_an_earlier_output_folder_beside_the_checkpoints_is_left_out(tmp_path, capsys):
    for step in STEPS:
        folder(tmp_path / "run", step)
    earlier = tmp_path / "run" / "checkpoint-30.avg-equal-n3"
    assert run(capsys, tmp_path / "run", "-o", earlier) == (0, "")
    code, err = run(capsys, tmp_path / "run", "-o", tmp_path / "avg")
    assert (code, err) == (
        0,
        f"streamavg: note: left out {earlier}: an earlier streamavg output\n",
    )
    np.testing.assert_array_equal(
        load_file(tmp_path / "avg" / "model.safetensors")["w"], np.full(4, 20.0)
    )
