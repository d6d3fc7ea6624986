"""The index of a sharded checkpoint, read and checked in one place for Keras's manifests
and Hugging Face's safetensors indexes: what it returns, what it refuses, in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamavg.errors import StreamavgError
from streamavg.formats import shard_index
from streamavg.formats.shard_index import Kind, ShardIndex

MANY = Kind(".weights.json", "manifest", 1 << 20)
ONE = Kind(".index.json", "index", 1 << 20, lists=False)
SHAPE = 'corrupt manifest (not {"metadata": {...}, "weight_map": {...}})'


def write(path: Path, document: object) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def refusal(path: Path, kind: Kind = MANY) -> str:
    with pytest.raises(StreamavgError) as e:
        shard_index.read(path, kind)
    return str(e.value)


def test_an_index_is_read_into_one_record(tmp_path):
    document = {"weight_map": {"/a": ["x_0.h5", "x_1.h5", "x_0.h5"], "/b": "x_1.h5"}, "n": 1}
    path = write(tmp_path / "x.weights.json", document)
    index = shard_index.read(path, MANY)
    assert isinstance(index, ShardIndex)
    assert (index.path, index.document, index.metadata) == (path, document, {})
    assert index.weight_map == {"/a": ["x_0.h5", "x_1.h5"], "/b": ["x_1.h5"]}  # once each
    assert index.shards == ["x_0.h5", "x_1.h5"]
    assert index.stat.st_size == path.stat().st_size
    index.check_unchanged()
    write(path, {**document, "metadata": {"changed": True}})
    with pytest.raises(StreamavgError, match="changed while being averaged"):
        index.check_unchanged()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "corrupt manifest (not UTF-8 JSON)"),
        (b'{"weight_map": {"\xff": "a"}}', "corrupt manifest (not UTF-8 JSON)"),
        ('{"weight_map": {"a": ["\\udc00"]}}', "corrupt manifest (not UTF-8 JSON)"),
        ('{"metadata": ' + "[" * 100_000, "corrupt manifest (nested too deeply)"),
        ("[]", SHAPE),
        ('{"metadata": [], "weight_map": {}}', SHAPE),
        ('{"weight_map": []}', SHAPE),
        ('{"metadata": {"a": 1, "a": 2}, "weight_map": {}}', "a: listed twice"),
        ('{"weight_map": {"/a": "x.h5", "/a": "y.h5"}}', "/a: listed twice"),
        ('{"weight_map": {"/a": []}}', "/a: not a shard file name or a list of them"),
        ('{"weight_map": {"/a": [1]}}', "/a: not a shard file name or a list of them"),
        ('{"weight_map": {"/a": null}}', "/a: not a shard file name or a list of them"),
    ],
)
def test_what_is_no_index_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "x.weights.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert refusal(path) == f"{path}: {message}"


@pytest.mark.parametrize("name", ["", ".", "..", "../x.h5", "/etc/passwd", "a/b.h5", "a\0b"])
def test_a_shard_name_must_be_a_file_name_in_the_folder(tmp_path, name):
    for value in (name, ["x.h5", name]):
        path = write(tmp_path / "x.weights.json", {"weight_map": {"/a": value}})
        assert refusal(path) == f"{path}: /a: {name!r} is not a file name in this folder"


def test_a_kind_of_one_shard_per_key_refuses_a_list(tmp_path):
    path = write(tmp_path / "m.index.json", {"weight_map": {"w": "m-1.st", "v": ["m-1.st"]}})
    assert refusal(path, ONE) == f"{path}: v: not a shard file name"
    write(path, {"weight_map": {"w": "m-1.st"}, "metadata": {"total_size": 8}})
    assert shard_index.read(path, ONE).weight_map == {"w": ["m-1.st"]}


def test_what_is_no_regular_file_or_over_the_limit_is_never_read(tmp_path):
    big = tmp_path / "big.weights.json"
    big.touch()
    os.truncate(big, 1001)
    assert refusal(big, MANY._replace(limit=1000)) == (
        f"{big}: manifest of 1,001 bytes, over the limit of 1,000"
    )
    fifo = tmp_path / "fifo.weights.json"
    os.mkfifo(fifo)
    assert refusal(fifo) == f"{fifo}: not a regular file (a device, FIFO or socket)"
    (tmp_path / "dir.weights.json").mkdir()
    assert refusal(tmp_path / "dir.weights.json").endswith(": is a directory, not a file")


def test_parts_lists_each_shard_with_its_index_and_nothing_of_an_unreadable_one(tmp_path):
    a = write(tmp_path / "a.weights.json", {"weight_map": {"/x": ["a_0.h5", "a_1.h5"]}})
    b = write(tmp_path / "b.weights.json", {"weight_map": {"/x": "b_0.h5"}})
    write(tmp_path / "c.weights.json", {"weight_map": {"/x": "c_0.h5", "/y": "../escape.h5"}})
    write(tmp_path / "d.index.json", {"weight_map": {"w": "d_0.st"}})  # another kind
    (tmp_path / "e.weights.json").mkdir()
    assert shard_index.parts(tmp_path, MANY) == {"a_0.h5": a, "a_1.h5": a, "b_0.h5": b}
