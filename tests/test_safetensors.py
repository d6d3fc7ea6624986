"""Safetensors checkpoints, single files and Hugging Face sharded folders, written by the
safetensors library itself: averages match np.average, outputs load back in the library,
and hostile headers are refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest
from conftest import killed_while_writing, snapshot, ulp_distance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save, save_file  # noqa: E402

import streamavg  # noqa: E402
from streamavg.cli import main, one_line  # noqa: E402
from streamavg.errors import StreamavgError  # noqa: E402
from streamavg.formats import open_checkpoint  # noqa: E402
from streamavg.formats.safetensors import DTYPES  # noqa: E402

STEPS = (100, 200, 1000)  # 1000 sorts before 200 as text: the order must come from the numbers
BIG = "model.embed.weight"  # bigger than a piece under --max-memory 1M: read in blocks
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
EXIT_ERROR = 1


class Made(NamedTuple):
    root: Path
    arrays: list[dict[str, np.ndarray]]  # per step, oldest first


def tensors(rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
    return {
        BIG: rng.standard_normal((300, 700)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(5).astype(np.float16),
        "model.proj.weight": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "lm_head.bias": rng.standard_normal(2),
        "model.scale": np.array(step / 7, np.float32),  # 0-d
        "model.empty": np.zeros((0, 3), np.float32),
        "model.position_ids": np.arange(4, dtype=np.int64),  # equal everywhere: copied
    }


def write_sharded(folder: Path, arrays: dict[str, np.ndarray], shards: dict[str, list[str]]):
    """A folder as transformers' save_pretrained writes it: shards, and a sorted,
    indented index whose total_size counts the tensors' bytes."""
    folder.mkdir(parents=True)
    for shard, names in shards.items():
        save_file({n: arrays[n] for n in names}, folder / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
        "weight_map": {n: shard for shard, names in shards.items() for n in names},
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """files/step_N.safetensors, and sharded/checkpoint-N/ (the oldest in three shards,
    the others in two), holding the same tensors."""
    root = tmp_path_factory.mktemp("safetensors")
    rng = np.random.default_rng(0)
    arrays = [tensors(rng, step) for step in STEPS]
    (root / "files").mkdir()
    for step, a in zip(STEPS, arrays, strict=True):
        save_file(a, root / "files" / f"step_{step}.safetensors", metadata={"format": "pt"})
        names = sorted(a)
        layout = {SHARDS[0]: [BIG, "model.position_ids"]}
        layout[SHARDS[1]] = [n for n in names if n not in layout[SHARDS[0]]]
        if step == STEPS[0]:
            layout = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
        write_sharded(root / "sharded" / f"checkpoint-{step}", a, layout)
    return Made(root, arrays)


def copy(made: Made, which: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made.root / which, tmp_path / which))


def check_average(got: dict[str, np.ndarray], arrays: list[dict], weights) -> None:
    """Floats within one ulp of np.average in float64, integers those of the newest."""
    assert sorted(got) == sorted(arrays[-1])
    for name, value in got.items():
        want = arrays[-1][name]
        assert (value.dtype, value.shape) == (want.dtype, want.shape), name
        if value.dtype.kind in "iub":
            assert np.array_equal(value, want), name
            continue
        stack = np.array([a[name] for a in arrays]).astype(np.float64)
        reference = np.average(stack, axis=0, weights=weights).astype(value.dtype)
        assert ulp_distance(value, reference) <= 1, name


def provenance(path: Path) -> dict:
    with safe_open(path, framework="np") as f:
        return json.loads(f.metadata()["streamavg"])


# -- averages -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["equal", "linear", "exp"])
def test_cli_average_matches_np_average_within_one_ulp(made, tmp_path, capsys, scheme):
    out = tmp_path / "avg.safetensors"
    args = [str(made.root / "files"), "-o", str(out), "--scheme", scheme, "--quiet"]
    assert main([*args, "--max-memory", "1M"]) == 0
    capsys.readouterr()
    weights = streamavg.scheme_weights(scheme, len(STEPS))
    check_average(load_file(out), made.arrays, weights)
    with safe_open(out, framework="np") as f:
        assert f.metadata()["format"] == "pt"
    assert provenance(out)["files"] == [f"step_{s}.safetensors" for s in STEPS]
    assert provenance(out)["weights"] == weights.tolist()
    again = tmp_path / "again.safetensors"
    assert main([str(made.root / "files"), "-o", str(again), "--scheme", scheme, "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()  # other pieces, other threads: same bytes


def test_api_average_and_default_output(made, tmp_path):
    src = copy(made, "files", tmp_path)
    result = streamavg.average([src], scheme="linear")
    assert result.output == src / "averaged" / "step_1000.avg-linear-n3.safetensors"
    assert result.files == tuple(src / f"step_{s}.safetensors" for s in STEPS)
    check_average(load_file(result.output), made.arrays, result.weights)
    tensors_in_memory = streamavg.average_tensors([src], scheme="linear")
    for name, value in load_file(result.output).items():
        assert tensors_in_memory[name].tobytes() == value.tobytes(), name


def test_output_is_laid_out_as_the_safetensors_library_writes_it(tmp_path):
    """Without other metadata, the output is byte for byte what save_file writes for the
    averaged tensors and our provenance: header order, compact JSON, space padding."""
    rng = np.random.default_rng(1)
    for step in (1, 2):
        a = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a": rng.standard_normal(7)}
        a["c"] = rng.standard_normal(3).astype(ml_dtypes.bfloat16)
        save_file(a, tmp_path / f"step_{step}.safetensors")
    out = tmp_path / "out" / "avg.safetensors"
    streamavg.average([tmp_path], output=out)
    with safe_open(out, framework="np") as f:
        metadata = f.metadata()
    assert list(metadata) == ["streamavg"]
    assert out.read_bytes() == save(load_file(out), metadata=metadata)
    (length,) = struct.unpack("<Q", out.read_bytes()[:8])
    assert length % 8 == 0


def test_float8_integers_and_booleans(tmp_path):
    """float8 is averaged (numpy's loader cannot read it: checked with our reader);
    unsigned, narrow and boolean tensors, equal everywhere, are copied."""
    rng = np.random.default_rng(2)
    arrays = []
    for step in (1, 2, 3):
        a = {
            "e4m3": rng.standard_normal(6).astype(ml_dtypes.float8_e4m3fn),
            "e5m2": rng.standard_normal(6).astype(ml_dtypes.float8_e5m2),
            "u8": np.arange(5, dtype=np.uint8),
            "i32": np.arange(3, dtype=np.int32) - 1,
            "u16": np.arange(3, dtype=np.uint16),
            "mask": np.array([True, False, True]),
        }
        save_file(a, tmp_path / f"step_{step}.safetensors")
        arrays.append(a)
    out = tmp_path / "out" / "avg.safetensors"
    result = streamavg.average([tmp_path], scheme="exp", output=out)
    with open_checkpoint(out) as ck:
        assert ck.format == "safetensors"
        got = {name: ck.read_whole(name) for name in ck.tensors}
    check_average(got, arrays, result.weights)


def test_scan_orders_by_step_number(made):
    files = streamavg.plan([made.root / "files"]).files
    assert [p.name for p in files] == [f"step_{s}.safetensors" for s in STEPS]


def test_an_earlier_output_beside_the_inputs_is_left_out(made, tmp_path):
    src = copy(made, "files", tmp_path)
    streamavg.average([src], output=src / "avg.safetensors")
    p = streamavg.plan([src])
    assert [f.name for f in p.files] == [f"step_{s}.safetensors" for s in STEPS]
    assert p.notes == (f"left out {src / 'avg.safetensors'}: an earlier streamavg output",)


def test_inspect_names_the_formats(made, capsys):
    newest = made.root / "files" / "step_1000.safetensors"
    assert main(["inspect", str(newest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{newest}: safetensors, 7 tensors, ")
    assert f"model      {BIG}" in out and "bfloat16" in out
    folder = made.root / "sharded" / "checkpoint-1000"
    assert main(["inspect", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"{folder}: huggingface, 7 tensors, ")


def test_a_safetensors_file_under_another_name_is_read_by_its_content(made, tmp_path):
    renamed = tmp_path / "step_100.bin"
    shutil.copy(made.root / "files" / "step_100.safetensors", renamed)
    with open_checkpoint(renamed) as ck:
        assert ck.format == "safetensors"
        assert np.array_equal(ck.read_whole("lm_head.bias"), made.arrays[0]["lm_head.bias"])


def test_corrupt_provenance_is_refused_when_shown(tmp_path, capsys):
    path = tmp_path / "step_1.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path, metadata={"streamavg": "{not json"})
    assert main(["inspect", str(path)]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f"streamavg: error: {path}: corrupt streamavg provenance in __metadata__\n"
    )


# -- sharded folders -------------------------------------------------------------------------


def test_sharded_folders_average_shard_by_shard(made, tmp_path, capsys):
    parent = made.root / "sharded"
    out = tmp_path / "avg"
    assert main([str(parent), "-o", str(out), "--scheme", "linear", "--quiet"]) == 0
    assert main([str(parent), "-o", str(tmp_path / "again"), "--scheme", "linear", "-q"]) == 0
    capsys.readouterr()
    newest = parent / "checkpoint-1000"
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, *SHARDS])
    got = {}
    for shard in SHARDS:
        part = load_file(out / shard)
        assert list(part) == list(load_file(newest / shard))  # laid out like the newest's
        got |= part
        assert (tmp_path / "again" / shard).read_bytes() == (out / shard).read_bytes()
    weights = streamavg.scheme_weights("linear", len(STEPS))
    check_average(got, made.arrays, weights)
    index = json.loads((newest / INDEX).read_text())
    recorded = json.loads((out / INDEX).read_text())["metadata"]["streamavg"]
    assert recorded["files"] == [f"checkpoint-{s}" for s in STEPS]
    assert recorded["weights"] == weights.tolist()
    index["metadata"]["streamavg"] = recorded  # the newest's index, as transformers writes it
    assert (out / INDEX).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"


def test_sharded_default_output_is_a_folder_the_next_scan_leaves_out(made, tmp_path):
    parent = copy(made, "sharded", tmp_path)
    result = streamavg.average([parent], max_memory=1 << 20)
    assert result.output == parent / "averaged" / "checkpoint-1000.avg-equal-n3"
    assert streamavg.plan([parent]).files == result.files
    again = streamavg.average([parent / "checkpoint-1000", parent / "checkpoint-200"])
    assert again.files == (parent / "checkpoint-200", parent / "checkpoint-1000")


@pytest.mark.parametrize("part", [SHARDS[0], INDEX])
def test_naming_a_shard_alone_is_refused(made, capsys, part):
    folder = made.root / "sharded" / "checkpoint-200"
    assert main([str(folder / part), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f"streamavg: error: {folder / part}: a part of checkpoint {folder}; name that instead\n"
    )


# -- refusals --------------------------------------------------------------------------------


def test_integer_tensors_that_differ_are_refused(made, tmp_path, capsys):
    src = copy(made, "files", tmp_path)
    oldest, newest = src / "step_100.safetensors", src / "step_1000.safetensors"
    changed = dict(made.arrays[0], **{"model.position_ids": np.arange(4, dtype=np.int64) + 1})
    save_file(changed, oldest, metadata={"format": "pt"})
    before = snapshot(src)
    assert main([str(src), "-o", str(src / "avg.safetensors"), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f"streamavg: error: {oldest}: model.position_ids: int64 values differ from {newest} "
        "(integer weights, such as quantized kernels, cannot be averaged; pass --integers "
        "newest to take such layers from the newest checkpoint)\n"
    )
    assert snapshot(src) == before


def raw(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file by hand: `header` (JSON text as bytes, or an object) and `data`."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    as_list = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    return {"dtype": dtype, "shape": as_list(shape), "data_offsets": as_list(offsets)}


W = "model.w"
HOSTILE = {  # file contents -> the refusal after "<file>: "
    "too short": (b"\x10\x00", "too short for a safetensors file (2 bytes)"),
    "header over the library's limit": (
        raw({W: entry()}, bytes(8), length=100_000_001),
        "safetensors header of 100,000,001 bytes, over the limit of 100,000,000",
    ),
    "header past the end": (
        raw(b"{}", length=1000),
        "safetensors header of 1,000 bytes runs past the end of the file (10 bytes; truncated?)",
    ),
    "not UTF-8": (raw(b'{"\xff": 1}'), "corrupt safetensors header (not UTF-8 JSON)"),
    "not JSON": (raw(b'{"a": '), "corrupt safetensors header (not UTF-8 JSON)"),
    "lone surrogate": (
        raw(b'{"\\ud800": ' + json.dumps(entry()).encode() + b"}", bytes(8)),
        "corrupt safetensors header (not UTF-8 JSON)",
    ),
    "nested too deeply": (raw(b"[" * 100_000), "corrupt safetensors header (nested too deeply)"),
    "not an object": (raw([1, 2]), "corrupt safetensors header (not a JSON object)"),
    "duplicate tensor": (
        raw(b'{"%s": %s, "%s": %s}' % ((W.encode(), json.dumps(entry()).encode()) * 2), bytes(8)),
        f"{W}: listed twice",
    ),
    "entry not an object": (raw({W: [1]}), f"{W}: header entry is not an object"),
    "no dtype": (
        raw({W: {"shape": [2], "data_offsets": [0, 8]}}),
        f"{W}: header entry has no dtype",
    ),
    "no shape": (
        raw({W: {"dtype": "F32", "data_offsets": [0, 8]}}),
        f"{W}: header entry has no shape",
    ),
    "no data_offsets": (
        raw({W: {"dtype": "F32", "shape": [2]}}),
        f"{W}: header entry has no data_offsets",
    ),
    "unknown dtype": (raw({W: entry("C64")}, bytes(8)), f'{W}: unknown dtype "C64"'),
    "dtype not a string": (raw({W: entry(4)}, bytes(8)), f"{W}: unknown dtype 4"),
    "negative dimension": (
        raw({W: entry(shape=(-2,))}, bytes(8)),
        f"{W}: shape is not a list of non-negative integers",
    ),
    "shape not a list": (
        raw({W: entry(shape="2")}, bytes(8)),
        f"{W}: shape is not a list of non-negative integers",
    ),
    "boolean dimension": (
        raw({W: entry(shape=[True])}, bytes(8)),
        f"{W}: shape is not a list of non-negative integers",
    ),
    "offsets reversed": (
        raw({W: entry(offsets=(8, 0))}, bytes(8)),
        f"{W}: data_offsets is not [begin, end] with 0 <= begin <= end",
    ),
    "one offset": (
        raw({W: entry(offsets=(8,))}, bytes(8)),
        f"{W}: data_offsets is not [begin, end] with 0 <= begin <= end",
    ),
    "offsets not integers": (
        raw({W: entry(offsets=(0.0, 8.0))}, bytes(8)),
        f"{W}: data_offsets is not [begin, end] with 0 <= begin <= end",
    ),
    "offsets disagree with the shape": (
        raw({W: entry(shape=(3,))}, bytes(8)),
        f"{W}: data_offsets hold 8 bytes, but shape [3] of F32 needs 12",
    ),
    "offsets out of range": (
        raw({W: entry(shape=(4,), offsets=(0, 16))}, bytes(12)),
        f"{W}: data ends at byte 16, past the 12 bytes of data (truncated file?)",
    ),
    "overlapping tensors": (
        raw({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12)),
        "b: data overlaps that of a",
    ),
    "an empty tensor inside another": (
        raw({"a": entry(), "b": entry(shape=(0,), offsets=(4, 4))}, bytes(8)),
        "b: data overlaps that of a",
    ),
    "gap": (
        raw({"a": entry(), "b": entry(offsets=(12, 20))}, bytes(20)),
        "b: 4 bytes before its data belong to no tensor (the safetensors library refuses gaps)",
    ),
    "trailing bytes": (
        raw({"a": entry()}, bytes(12)),
        "4 bytes after the last tensor's data (the safetensors library refuses them)",
    ),
    "metadata not strings": (
        raw({"__metadata__": {"format": 1}, "a": entry()}, bytes(8)),
        "__metadata__ is not an object of strings",
    ),
    "metadata not an object": (
        raw({"__metadata__": ["pt"], "a": entry()}, bytes(8)),
        "__metadata__ is not an object of strings",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_are_refused_in_one_line(made, tmp_path, capsys, case):
    content, message = HOSTILE[case]
    src = copy(made, "files", tmp_path)
    victim = src / "step_200.safetensors"
    victim.write_bytes(content)
    before = snapshot(src)
    assert main([str(src), "-o", str(src / "avg.safetensors"), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == f"streamavg: error: {victim}: {message}\n"
    assert snapshot(src) == before


def test_a_truncated_file_is_refused_naming_the_tensor_cut_short(made, tmp_path, capsys):
    src = copy(made, "files", tmp_path)
    victim = src / "step_1000.safetensors"
    data = victim.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__")
    last, end = max(((n, e["data_offsets"][1]) for n, e in header.items()), key=lambda x: x[1])
    victim.write_bytes(data[:-1])
    before = snapshot(src)
    assert main([str(src), "-o", str(src / "avg.safetensors"), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f"streamavg: error: {victim}: {last}: data ends at byte {end:,}, past the "
        f"{end - 1:,} bytes of data (truncated file?)\n"
    )
    assert snapshot(src) == before


def edit_index(change):
    def damage(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        change(index)
        (folder / INDEX).write_text(json.dumps(index))

    return damage


def write_index(text: str):
    return lambda folder: (folder / INDEX).write_text(text)


def reshard(extra: str):
    """The first shard holds `extra` too, which the second shard holds already."""

    def damage(folder: Path) -> None:
        shard = load_file(folder / SHARDS[0]) | {extra: load_file(folder / SHARDS[1])[extra]}
        save_file(shard, folder / SHARDS[0], metadata={"format": "pt"})

    return damage


ESCAPE = "../checkpoint-100/model-00001-of-00003.safetensors"
#: (braces doubled: each message is formatted with the folder)
NOT_AN_INDEX = ': corrupt safetensors index (not {{"metadata": {{...}}, "weight_map": {{...}}}})'
SHARDED_HOSTILE = {  # folder -> (damage, the refusal, with {d} the folder)
    "index not JSON": (
        write_index("{"),
        "{d}/" + INDEX + ": corrupt safetensors index (not UTF-8 JSON)",
    ),
    "no weight_map": (write_index('{"metadata": {}}'), "{d}/" + INDEX + NOT_AN_INDEX),
    "shard not a string": (
        edit_index(lambda i: i["weight_map"].update({BIG: 1})),
        "{d}/" + INDEX + f": {BIG}: not a shard file name",
    ),
    "shards in a list": (
        edit_index(lambda i: i["weight_map"].update({BIG: [SHARDS[0]]})),
        "{d}/" + INDEX + f": {BIG}: not a shard file name",
    ),
    "metadata not an object": (
        edit_index(lambda i: i.update(metadata=[])),
        "{d}/" + INDEX + NOT_AN_INDEX,
    ),
    "tensor listed twice": (
        write_index(f'{{"weight_map": {{"{BIG}": "{SHARDS[0]}", "{BIG}": "{SHARDS[1]}"}}}}'),
        "{d}/" + INDEX + f": {BIG}: listed twice",
    ),
    "shard outside the folder": (
        edit_index(lambda i: i["weight_map"].update({BIG: ESCAPE})),
        "{d}/" + INDEX + f": {BIG}: {ESCAPE!r} is not a file name in this folder",
    ),
    "shard in a subfolder": (
        edit_index(lambda i: i["weight_map"].update({BIG: "sub/x.safetensors"})),
        "{d}/" + INDEX + f": {BIG}: 'sub/x.safetensors' is not a file name in this folder",
    ),
    "listed shard missing": (
        lambda d: (d / SHARDS[1]).unlink(),
        "{d}/" + SHARDS[1] + f": listed in {INDEX}, but missing",
    ),
    "tensor missing from its shard": (
        edit_index(lambda i: i["weight_map"].update({"model.extra": SHARDS[0]})),
        "{d}/" + SHARDS[0] + f": model.extra: in the weight_map of {INDEX}, but missing "
        "from this shard",
    ),
    "tensor the weight_map omits": (
        edit_index(lambda i: i["weight_map"].pop("model.norm.weight")),
        "{d}/" + SHARDS[1] + f": model.norm.weight: not in the weight_map of {INDEX}",
    ),
    "tensor the weight_map puts elsewhere": (
        edit_index(lambda i: i["weight_map"].update({"model.norm.weight": SHARDS[0]})),
        "{d}/" + SHARDS[1] + f": model.norm.weight: here, but the weight_map of {INDEX} puts "
        f"it in {SHARDS[0]}",
    ),
    "tensor in two shards": (
        reshard("model.norm.weight"),
        "{d}/" + SHARDS[1] + f": model.norm.weight: also in {SHARDS[0]}",
    ),
    "two indexes": (
        lambda d: shutil.copy(d / INDEX, d / "other.safetensors.index.json"),
        "{d}/" + SHARDS[0] + ": listed by both " + INDEX + " and other.safetensors.index.json",
    ),
    "index over the limit": (
        lambda d: os.truncate(d / INDEX, 100_000_001),
        "{d}/" + INDEX + ": safetensors index of 100,000,001 bytes, over the limit of 100,000,000",
    ),
    "hostile shard": (
        lambda d: (d / SHARDS[1]).write_bytes(raw(b"[")),
        "{d}/" + SHARDS[1] + ": corrupt safetensors header (not UTF-8 JSON)",
    ),
}


@pytest.mark.parametrize("case", list(SHARDED_HOSTILE))
def test_hostile_sharded_folders_are_refused_in_one_line(made, tmp_path, capsys, case):
    damage, message = SHARDED_HOSTILE[case]
    parent = copy(made, "sharded", tmp_path)
    victim = parent / "checkpoint-200"
    damage(victim)
    before = snapshot(parent)
    assert main([str(parent), "-o", str(parent / "avg"), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == f"streamavg: error: {message.format(d=victim)}\n"
    assert snapshot(parent) == before


def test_a_changed_file_is_refused(made, tmp_path):
    src = copy(made, "files", tmp_path)
    path = src / "step_100.safetensors"
    changed = f"{path}: changed while being averaged (still being written?)"
    with open_checkpoint(path) as ck:
        ck.settle(release=True)  # closed: every read reopens it, and checks it
        assert np.array_equal(ck.read_whole(BIG), made.arrays[0][BIG])
        shutil.copy(src / "step_200.safetensors", path)
        with pytest.raises(StreamavgError) as e:
            ck.read_whole(BIG)
        assert str(e.value) == changed
        with pytest.raises(StreamavgError) as e:
            ck.check_unchanged()
        assert str(e.value) == changed


def test_a_changed_index_is_refused(made, tmp_path):
    folder = copy(made, "sharded", tmp_path) / "checkpoint-200"
    with open_checkpoint(folder) as ck:
        with (folder / INDEX).open("a") as f:
            f.write("\n")
        with pytest.raises(StreamavgError) as e:
            ck.check_unchanged()
    assert str(e.value) == f"{folder / INDEX}: changed while being averaged (still being written?)"


# -- faults ----------------------------------------------------------------------------------


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """RLIMIT_FSIZE lowered for this process (Python ignores SIGXFSZ: a write past it fails
    with EFBIG), then restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize(("which", "name"), [("files", "avg.safetensors"), ("sharded", "avg")])
def test_a_failed_write_leaves_no_output_and_no_temporary_file(made, tmp_path, capsys, which, name):
    """The averaged bytes fit the file size limit (the check before starting passes), the
    whole file does not: the write fails, and the output and its temporary go."""
    out = tmp_path / "new" / name
    floats = sum(a.nbytes for a in made.arrays[-1].values() if a.dtype.kind in "fV")
    with file_size_limit(floats):
        code = main([str(made.root / which), "-o", str(out), "-q"])
    assert (code, capsys.readouterr().err) == (
        EXIT_ERROR,
        f"streamavg: error: {out}: cannot write (File too large)\n",
    )
    assert list(tmp_path.iterdir()) == []  # the folder made for the output went too


def test_integers_newest_takes_only_their_module_whole(made, tmp_path, capsys):
    """Dotted names: the module of a differing integer tensor (`model` holds
    `model.position_ids` and `model.scale`) is taken from the newest; its submodules
    (`model.norm`) and the rest are averaged."""
    src = copy(made, "files", tmp_path)
    changed = dict(made.arrays[0], **{"model.position_ids": np.arange(4, dtype=np.int64) + 1})
    save_file(changed, src / "step_100.safetensors", metadata={"format": "pt"})
    out = tmp_path / "avg.safetensors"
    assert main([str(src), "-o", str(out), "--integers", "newest", "-q"]) == 0
    newest = src / "step_1000.safetensors"
    assert capsys.readouterr().err == (
        f"streamavg: note: model: integers differ, so taken whole from {newest}\n"
    )
    got, arrays = load_file(out), [changed, *made.arrays[1:]]
    whole = {"model.position_ids", "model.scale", "model.empty"}
    for name in whole:
        assert got[name].tobytes() == made.arrays[-1][name].tobytes(), name
    averaged = {n: v for n, v in got.items() if n not in whole}
    check_average(averaged, [{n: a[n] for n in averaged} for a in arrays], None)


def test_a_sharded_folder_keeps_its_config_but_not_training_state(made, tmp_path):
    """config.json and tokenizer files come along, for from_pretrained; optimizer,
    scheduler and RNG state, the trainer's log and other weights do not."""
    parent = copy(made, "sharded", tmp_path)
    newest = parent / "checkpoint-1000"
    kept = {"config.json": "{}\n", "tokenizer.json": '{"v": 1}\n'}
    dropped = ["optimizer.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"]
    for folder in parent.iterdir():
        for name, text in kept.items():
            (folder / name).write_text(text)
    for name in dropped:
        (newest / name).write_bytes(b"state")
    out = tmp_path / "avg"
    assert main([str(parent), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, *SHARDS, *kept])
    for name, text in kept.items():
        assert (out / name).read_text() == text
    assert main([str(parent), "-o", str(tmp_path / "all"), "-q", "--optimizer", "newest"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(
        [INDEX, *SHARDS, *kept, *dropped]
    )


def test_a_config_in_one_checkpoint_only_is_refused(made, tmp_path, capsys):
    parent = copy(made, "sharded", tmp_path)
    (parent / "checkpoint-1000" / "config.json").write_text("{}\n")
    assert main([str(parent), "-o", str(tmp_path / "avg"), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f"streamavg: error: {parent / 'checkpoint-100'}: config.json: missing (present in "
        f"{parent / 'checkpoint-1000'}); the weights would be averaged across different "
        "models (pass --companions newest to take the newest's)\n"
    )
    assert main([str(parent), "-o", str(tmp_path / "avg"), "-q", "--companions", "newest"]) == 0
    assert capsys.readouterr().err == (
        f"streamavg: note: config.json differs in {parent / 'checkpoint-100'}: taken from the "
        f"newest, {parent / 'checkpoint-1000'}\n"
    )


# -- any header at all ------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "C64", ""]) | JSON,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(-2, 40), min_size=2, max_size=2) | JSON,
    }
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4),
    data=st.binary(max_size=48),
)
def test_any_header_is_read_exactly_or_refused_in_one_line(tmp_path, header, data):
    """Whatever the header holds, opening the file either lists tensors whose bytes are
    exactly their data ranges, or refuses with a StreamavgError; nothing else escapes."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw(header, data))
    try:
        ck = open_checkpoint(path)
    except StreamavgError as e:
        assert str(e).startswith(f"{path}: ")
        assert "\n" not in one_line(e)  # as the command line prints it
        return
    with ck:
        start = 8 + len(json.dumps(header).encode())
        for name, t in ck.tensors.items():
            begin, end = header[name]["data_offsets"]
            assert ck.read_whole(name).tobytes() == data[begin:end]
            assert t.nbytes == end - begin and start + end <= path.stat().st_size


def test_a_name_with_a_newline_cannot_split_the_message(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw({"w\nstreamavg: note: all good": entry(dtype="C64")}, bytes(8)))
    assert main([str(path), "-q"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        f'streamavg: error: {path}: w\\nstreamavg: note: all good: unknown dtype "C64"\n'
    )


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 hard links to one 32 MB file, and 60 sharded folders of links: runs long enough
    to be killed while they write."""
    root = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(1)
    save_file({"w": rng.standard_normal((2000, 4000)).astype(np.float32)}, root / "one.safetensors")
    write_sharded(
        root / "folder", {"w": load_file(root / "one.safetensors")["w"]}, {SHARDS[0]: ["w"]}
    )
    for i in range(60):
        (root / "files").mkdir(exist_ok=True)
        os.link(root / "one.safetensors", root / "files" / f"step_{i:02d}.safetensors")
        (root / "sharded" / f"checkpoint-{i:02d}").mkdir(parents=True)
        for f in (root / "folder").iterdir():
            os.link(f, root / "sharded" / f"checkpoint-{i:02d}" / f.name)
    return root


@pytest.mark.parametrize(("which", "name"), [("files", "avg.safetensors"), ("sharded", "avg")])
def test_a_killed_run_leaves_no_output_and_the_next_run_cleans_up(slow, tmp_path, which, name):
    out = tmp_path / name
    _, temp = killed_while_writing(tmp_path, slow / which, "-o", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [temp]
    assert temp.name.startswith(f".{name}.streamavg-")
    again = tmp_path / f"again-{name}"
    assert main([str(slow / which), "--last", "2", "-o", str(again), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [again.name]
