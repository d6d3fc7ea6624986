"""Orbax checkpoints, as `keras.callbacks.OrbaxCheckpoint` writes them: a root folder of
step folders (`ckpts/0/`, `ckpts/1/` ...), each holding `_CHECKPOINT_METADATA`, a
`model_config/` (the model's JSON) and a `pytree/` of arrays, zarr3 arrays in one OCDBT
store (`trainable_variables`, `non_trainable_variables`, `optimizer_variables` and
`metrics_variables`, keyed by the variables' paths).

A checkpoint is a step folder, or a root holding exactly one step (as an average is, and
as `keras.models.load_model(root)` reads one); a root of several steps is a folder of
checkpoints, ordered by step like epoch folders. The model's tensors are named by their
variable paths (`sequential/dense/kernel`), so a variable that became non-trainable still
matches; optimizer state keeps its pytree path (`optimizer_variables/adam/iteration`),
and so do the metrics' counters (`metrics_variables/...`, part "other", copied).

Arrays are read with TensorStore. Keras (through Orbax's defaults) stores every array as
one zstd-compressed chunk, and any read of a chunk decodes all of it, so such arrays say
so (`whole_reads`) and the fold reads each once, whole, from one checkpoint after
another: memory is a few times the largest array, whatever the number of checkpoints.
Averages (written by this module in chunks of `CHUNK_BYTES`) are read a block at a
time, each checkpoint caching the chunk its blocks come from.

The output is a root holding one step named as the newest input's, the newest's
`model_config/`, `_CHECKPOINT_METADATA` and other entries copied. Its pytree is written
without OCDBT (`use_ocdbt: false` in its `_METADATA`, which Orbax reads as such): one zarr3
array per folder, in chunks of at most `CHUNK_BYTES`, each written once when complete, so
memory stays bounded and the same inputs give the same bytes. The provenance is
`streamavg.json` in the step folder, which Orbax and Keras ignore.

Only TensorStore is imported (lazily: `claims` and `averaged` need nothing); Orbax
itself is not needed to read or write.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StreamavgError, UsageError
from ..remote import as_path, errors, is_url
from .base import (
    Companion,
    Reader,
    ReaderBase,
    Tensor,
    Write,
    check_same,
    copy_out,
    file_companion,
    identity,
    stat_of,
)

SUFFIXES = {"orbax": ""}  # a folder: an Orbax root
ACCEPTED: dict[str, tuple[str, ...]] = {}
METADATA = "_CHECKPOINT_METADATA"
PYTREE = "pytree"
MODEL_CONFIG = "model_config/_strings.json"
TREE_METADATA = "_METADATA"  # the pytree's leaves, and how they are stored
SHARDING = "_sharding"
ARRAY_METADATAS = "array_metadatas"
PROVENANCE_FILE = "streamavg.json"
TMP_MARK = ".orbax-checkpoint-tmp"  # a step being written: not a checkpoint yet
#: The pytree's top-level keys (Keras's `model.get_state_tree()`) and what part each is.
PARTS = {
    "trainable_variables": "model",
    "non_trainable_variables": "model",
    "optimizer_variables": "optimizer",
}
ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")  # leaves stored as TensorStore arrays
CACHE_SLACK = 8 << 20  # a checkpoint's cache: its largest chunk read in blocks, and this
CHUNK_BYTES = 4 << 20  # the output's chunks: what a later read decodes at a time
NEEDS_EXTRA = (
    "{}: an Orbax checkpoint; reading it needs the orbax extra (pip install 'streamavg[orbax]')"
)

_context_lock = threading.Lock()
_contexts: dict[str, Any] = {}


def _is_step(path: Path) -> bool:
    return TMP_MARK not in path.name and (path / METADATA).is_file() and (path / PYTREE).is_dir()


def step_folder(path: Path) -> Path | None:
    """The step folder that `path` is (or holds, as the only step of a root), if any."""
    if _is_step(path):
        return path
    try:
        steps = [e for e in path.iterdir() if e.name.isdigit() and e.is_dir()]
    except OSError:
        return None
    return steps[0] if len(steps) == 1 and _is_step(steps[0]) else None


def claims(path: Path, head: bytes) -> bool:
    """A folder is an Orbax checkpoint if it is a finished step folder (it holds
    `_CHECKPOINT_METADATA` and `pytree/`), or a root holding exactly one."""
    return not head and path.is_dir() and step_folder(path) is not None


def averaged(path: Path) -> bool:
    """Whether `path` is an earlier streamavg output: only our file's presence is checked."""
    step = step_folder(path)
    return step is not None and (step / PROVENANCE_FILE).is_file()


def open_checkpoint(
    path: Path, *, optimizer: bool = False, like: Reader | None = None
) -> Checkpoint:
    """Open Orbax checkpoint `path`; `like` is ignored (every step lists its own arrays)."""
    return Checkpoint(path, optimizer=optimizer)


def _tensorstore(path: Path):
    try:
        import tensorstore
    except ImportError:
        raise UsageError(NEEDS_EXTRA.format(path)) from None  # exit 2: not installed
    return tensorstore


def _context(ts, cache: int = 0):
    """A TensorStore context caching up to `cache` bytes of decoded chunks. All share one
    parent's thread pools; those without a cache are one context."""
    with _context_lock:
        if not _contexts:
            _contexts["parent"] = parent = ts.Context({})
            _contexts["plain"] = ts.Context({"cache_pool": {"total_bytes_limit": 0}}, parent)
        if cache:
            return ts.Context({"cache_pool": {"total_bytes_limit": cache}}, _contexts["parent"])
        return _contexts["plain"]


def _kvstore(folder: Path) -> dict:
    """TensorStore's key-value store for `folder`: on disk, or in S3 or GCS (where the
    environment's endpoint and region go too, as boto reads them)."""
    if not is_url(folder):
        return {"driver": "file", "path": os.fspath(folder) + "/"}
    bucket, _, key = folder.path.partition("/")
    if folder.protocol in ("s3", "s3a"):
        found = {
            "endpoint": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        }
        options = {k: v for k, v in found.items() if v}
        return {"driver": "s3", "bucket": bucket, "path": key + "/", **options}
    if folder.protocol in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": bucket, "path": key + "/"}
    raise StreamavgError(f"{folder}: Orbax checkpoints are read from disk, S3 or GCS only")


def _why(e: BaseException) -> str:
    """TensorStore's reason, without the spec it appends."""
    text = str(e).strip().split(" [tensorstore_spec=", 1)[0]
    return text.splitlines()[0] if text else type(e).__name__


def _load_json(path: Path, what: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StreamavgError(f"{what}: incomplete Orbax checkpoint (no {path.name})") from None
    except OSError as e:
        raise StreamavgError(f"{what}: cannot read {path.name} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StreamavgError(f"{what}: corrupt Orbax metadata in {path.name} ({e})") from None


class _Leaf:
    """One array of the pytree: its keys, its file name in the store, its name here."""

    def __init__(self, key: str, keys: tuple[str, ...], value_type: str) -> None:
        self.key = key  # as in _METADATA's tree_metadata
        self.keys = keys
        self.param = ".".join(keys)  # Orbax's name for it in the store
        self.value_type = value_type
        self.part = PARTS.get(keys[0], "other")
        self.name = "/".join(keys[1:] if self.part == "model" else keys)


def _leaves(meta: dict, where: Path) -> tuple[list[_Leaf], list[tuple[str, str]]]:
    """The pytree's array leaves, and the keys of the others (strings, empty nodes), each
    with its part, from `_METADATA`."""
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict) or not tree:
        raise StreamavgError(f"{where}: corrupt Orbax metadata in {TREE_METADATA} (no leaves)")
    leaves, others = [], []
    try:
        for key, entry in tree.items():
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            value = entry["value_metadata"]
            if not keys:
                raise ValueError("a leaf without keys")
            kind = value.get("value_type")
            if value.get("skip_deserialize") or kind == "string":  # empty nodes, strings
                others.append((key, PARTS.get(keys[0], "other")))
            elif kind in ARRAY_TYPES:
                leaves.append(_Leaf(key, keys, kind))
            else:
                raise StreamavgError(f"{where}: {'/'.join(keys)}: unsupported Orbax leaf {kind}")
    except (KeyError, TypeError, ValueError) as e:
        raise StreamavgError(f"{where}: corrupt Orbax metadata in {TREE_METADATA} ({e})") from None
    return leaves, others


def _supported(dtype: np.dtype, part: str) -> bool:
    """Model tensors are IEEE floats, bfloat16, integers or booleans."""
    if dtype.kind == "f":
        return dtype.itemsize in (2, 4, 8)
    return dtype.kind in "iub" or dtype.name == "bfloat16" or part != "model"


class Checkpoint(ReaderBase):
    """An open Orbax step: its arrays listed from the pytree's metadata, each opened with
    TensorStore; the model's, the metrics' and, with `optimizer`, the optimizer's."""

    format = "orbax"
    folder = True

    def __init__(self, path: str | os.PathLike, *, optimizer: bool = False) -> None:
        self.path = as_path(path)
        stat_of(self.path)
        step = step_folder(self.path)
        if step is None:
            raise StreamavgError(f"{self.path}: not an Orbax checkpoint (no step folder)")
        self.step = step
        self._ts = _tensorstore(self.path)
        pytree = step / PYTREE
        self._meta = _load_json(pytree / TREE_METADATA, self.path)
        if not isinstance(self._meta, dict):
            raise StreamavgError(f"{self.path}: corrupt Orbax metadata in {TREE_METADATA}")
        leaves, self._others = _leaves(self._meta, self.path)
        self._identity = self._files()
        self.size = sum(st[2] for st in self._identity.values())
        self._leaves = {leaf.name: leaf for leaf in leaves}
        if len(self._leaves) != len(leaves):
            raise StreamavgError(f"{self.path}: two pytree leaves with one variable path")
        ocdbt = self._meta.get("use_ocdbt")  # None: unknown, as Orbax tells it by the manifest
        self._use_ocdbt = (pytree / "manifest.ocdbt").is_file() if ocdbt is None else ocdbt
        self._use_zarr3 = bool(self._meta.get("use_zarr3"))
        if self._use_ocdbt and not (pytree / "manifest.ocdbt").is_file():
            raise StreamavgError(f"{self.path}: incomplete Orbax checkpoint (no manifest.ocdbt)")
        self._arrays: dict[str, Any] = {}  # opened for their metadata
        self._cached: dict[str, Any] = {}  # the same, opened again for reads, with a cache
        self._lock = threading.Lock()
        wanted = [leaf for leaf in leaves if optimizer or leaf.part != "optimizer"]
        self.tensors: dict[str, Tensor] = {}
        for leaf, array in zip(wanted, self._open([leaf.name for leaf in wanted]), strict=True):
            dtype = np.dtype(array.dtype.numpy_dtype)
            if not _supported(dtype, leaf.part):
                raise StreamavgError(f"{self.path}: {leaf.name}: unsupported dtype {dtype}")
            self.tensors[leaf.name] = Tensor(
                leaf.name, tuple(array.shape), dtype.name, leaf.part, dtype
            )
        chunks = [_chunk_bytes(self._arrays[n]) for n in self.tensors if not self.whole_reads(n)]
        self._reads = _context(self._ts, max(chunks) + CACHE_SLACK if chunks else 0)

    def _files(self) -> dict[str, tuple]:
        """Every file of the step, with what must not change while it is read."""
        if is_url(self.step):  # its objects' sizes and ETags, asked of the store
            with errors(self.step):
                self.step.fs.invalidate_cache(self.step.path)
                listed = self.step.fs.find(self.step.path, detail=True)
            root = self.step.path.rstrip("/") + "/"
            return {
                k.removeprefix(root): (0, 0, v["size"], v.get("ETag")) for k, v in listed.items()
            }
        found = {}
        try:
            for root, _, names in os.walk(self.step):
                for name in names:
                    p = Path(root, name)
                    found[str(p.relative_to(self.step))] = identity(p.stat())
        except OSError as e:
            raise StreamavgError(f"{self.path}: cannot read ({e.strerror})") from None
        return found

    def _spec(self, leaf: _Leaf) -> dict:
        pytree = self.step / PYTREE
        if self._use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": _kvstore(pytree), "path": leaf.param + "/"}
        else:
            kvstore = _kvstore(pytree / leaf.param)
        return {
            "driver": "zarr3" if self._use_zarr3 else "zarr",
            "kvstore": kvstore,
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
            "fill_missing_data_reads": False,  # a chunk missing is a damaged checkpoint
        }

    def _open(self, names: list[str]) -> list[Any]:
        """The TensorStore arrays `names`, opened all at once (each open reads metadata)."""
        missing = [n for n in names if n not in self._arrays]
        context = _context(self._ts)
        futures = [
            self._ts.open(self._spec(self._leaves[n]), read=True, context=context) for n in missing
        ]
        for name, future in zip(missing, futures, strict=True):
            try:
                array = future.result()
            except Exception as e:  # TensorStore raises ValueError and others
                raise StreamavgError(f"{self.path}: {name}: unreadable ({_why(e)})") from None
            with self._lock:
                self._arrays.setdefault(name, array)
        return [self._arrays[n] for n in names]

    def _array(self, name: str) -> Any:
        """Array `name` for reading data: opened again from its known metadata (no I/O) in
        this checkpoint's context, whose cache holds its largest chunk decoded."""
        array = self._cached.get(name)
        if array is not None:
            return array
        (array,) = self._open([name])
        try:
            array = self._ts.open(
                array.spec(), context=self._reads, assume_metadata=True, read=True
            ).result()
        except Exception as e:
            raise StreamavgError(f"{self.path}: {name}: unreadable ({_why(e)})") from None
        with self._lock:
            return self._cached.setdefault(name, array)

    def whole_reads(self, name: str) -> bool:
        """Keras's arrays are one compressed chunk each: any read decodes all of it."""
        array = self._arrays[name]
        return tuple(array.chunk_layout.read_chunk.shape or array.shape) == tuple(array.shape)

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        if not out.nbytes:
            return
        array = self._array(name)
        try:
            np.copyto(out, array[index].read().result().reshape(out.shape), casting="no")
        except Exception as e:
            raise StreamavgError(f"{self.path}: {name}: unreadable ({_why(e)})") from None

    def check_unchanged(self) -> None:
        if not is_url(self.step):
            for rel, known in self._identity.items():
                check_same(self.step / rel, known)
        if self._files() != self._identity:
            raise StreamavgError(
                f"{self.path}: changed while being averaged (still being written?)"
            )

    def companions(self) -> list[Companion]:
        """The model's config, which gives the arrays their meaning (Orbax keeps it as a
        JSON string in `model_config/_strings.json`)."""
        config = self.step / MODEL_CONFIG
        return [file_companion(config, MODEL_CONFIG)] if config.is_file() else []

    @property
    def provenance(self) -> dict | None:
        path = self.step / PROVENANCE_FILE
        return _load_json(path, self.path) if path.is_file() else None

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        """An Orbax root in `tmp` holding one step, named as this checkpoint's: the `fresh`
        arrays written by the caller, the other model and metrics arrays copied, the
        optimizer's too if `optimizer`; every other entry of the step copied as it is."""
        tmp.mkdir(exist_ok=True)
        out = tmp / _step_name(self.step)
        out.mkdir()
        for entry in sorted(self.step.iterdir()):  # _CHECKPOINT_METADATA, model_config/ ...
            if entry.name not in (PYTREE, PROVENANCE_FILE):
                copy_out(entry, out / entry.name)
        kept = [leaf for leaf in self._leaves.values() if optimizer or leaf.part != "optimizer"]
        self._open([leaf.name for leaf in kept])  # all at once, before one by one
        source = {leaf.name: self._array(leaf.name) for leaf in kept}
        chunks = {
            leaf.name: _chunk_shape(
                tuple(source[leaf.name].shape), source[leaf.name].dtype.numpy_dtype.itemsize
            )
            for leaf in kept
        }
        pytree = out / PYTREE
        pytree.mkdir()
        self._write_metadata(pytree, kept, chunks, optimizer=optimizer)
        context = _context(self._ts)
        targets = {}
        for leaf in kept:
            src = source[leaf.name]
            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": os.fspath(pytree / leaf.param) + "/"},
                "metadata": {
                    "shape": list(src.shape),
                    "data_type": np.dtype(src.dtype.numpy_dtype).name,
                    "fill_value": False if src.dtype.numpy_dtype == np.bool_ else 0,
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {"chunk_shape": list(chunks[leaf.name])},
                    },
                    "chunk_key_encoding": {"name": "default"},
                    "codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                    ],
                },
                "create": True,
                "store_data_equal_to_fill_value": True,  # Orbax refuses missing chunks
            }
            try:
                targets[leaf.name] = self._ts.open(spec, context=context).result()
            except Exception as e:
                raise OSError(f"{pytree / leaf.param}: {_why(e)}") from None
        fresh = set(fresh)
        for leaf in kept:
            if leaf.name not in fresh:
                self._copy(source[leaf.name], targets[leaf.name], chunks[leaf.name], leaf.name)
        writers = {n: _Chunks(targets[n], chunks[n], self.tensors[n].dtype) for n in fresh}

        def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
            writers[name].write(values, index)

        write.targets = None  # chunked and compressed: no process may write at offsets
        yield write
        for name, w in writers.items():
            if w.pending:
                raise StreamavgError(f"{self.path}: {name}: not every block was written")
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")

    def _copy(self, src: Any, dst: Any, chunk: tuple[int, ...], name: str) -> None:
        """Copy array `src` into `dst` one of `dst`'s chunks at a time."""
        for box in _grid(tuple(src.shape), chunk):
            index = tuple(slice(lo, hi) for lo, hi in box)
            try:
                values = src[index].read().result()
            except Exception as e:
                raise StreamavgError(f"{self.path}: {name}: unreadable ({_why(e)})") from None
            _store(dst, index, values)

    def _write_metadata(
        self,
        pytree: Path,
        kept: list[_Leaf],
        chunks: dict[str, tuple[int, ...]],
        *,
        optimizer: bool,
    ) -> None:
        """The pytree's `_METADATA` (its leaves, stored without OCDBT), and Orbax's
        sharding and array records, for the leaves kept."""
        keys = {leaf.key for leaf in kept}
        keys |= {key for key, part in self._others if optimizer or part != "optimizer"}
        meta = dict(self._meta)
        meta["tree_metadata"] = {k: v for k, v in self._meta["tree_metadata"].items() if k in keys}
        meta["use_ocdbt"] = False
        meta["use_zarr3"] = True
        (pytree / TREE_METADATA).write_text(json.dumps(meta))
        source = self.step / PYTREE
        params = {leaf.param: leaf for leaf in kept}
        if (source / SHARDING).is_file():
            sharding = _load_json(source / SHARDING, self.path)
            encoded = {base64.b64encode(p.encode()).decode() for p in params}
            kept_sharding = {k: v for k, v in sharding.items() if k in encoded}
            (pytree / SHARDING).write_text(json.dumps(kept_sharding))
        records = source / ARRAY_METADATAS
        if records.is_dir():
            (pytree / ARRAY_METADATAS).mkdir()
            for f in sorted(records.iterdir()):
                data = _load_json(f, self.path)
                rows = []
                for row in data.get("array_metadatas", []):
                    leaf = params.get(row.get("array_metadata", {}).get("param_name"))
                    if leaf is not None:
                        row["array_metadata"]["chunk_shape"] = list(chunks[leaf.name])
                        rows.append(row)
                data["array_metadatas"] = rows
                (pytree / ARRAY_METADATAS / f.name).write_text(json.dumps(data))
        for name in ("_strings.json", "commit_success.txt"):
            if (source / name).is_file():
                copy_out(source / name, pytree / name)

    def close(self) -> None:
        self._arrays.clear()
        self._cached.clear()


def _chunk_bytes(array: Any) -> int:
    """The bytes of one decoded chunk of `array`: what reading any part of it decodes."""
    shape = array.chunk_layout.read_chunk.shape or array.shape
    return math.prod(shape) * array.dtype.numpy_dtype.itemsize


def _step_name(step: Path) -> str:
    """The step number: the folder's name, or the number it ends with, else 0."""
    found = re.search(r"(\d+)$", step.name)
    return str(int(found[1])) if found else "0"


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of at most CHUNK_BYTES: runs along one axis of whole sub-arrays after it,
    like the fold's blocks, so a block touches few chunks."""
    if not shape:
        return ()
    elements = max(1, CHUNK_BYTES // itemsize)
    axis = next(k for k in range(len(shape)) if math.prod(shape[k + 1 :]) <= elements)
    rows = max(1, min(shape[axis], elements // max(1, math.prod(shape[axis + 1 :]))))
    return (*(1,) * axis, rows, *(max(1, n) for n in shape[axis + 1 :]))


def _grid(
    shape: tuple[int, ...], chunk: tuple[int, ...], box: list[tuple[int, int]] | None = None
) -> Iterator[list[tuple[int, int]]]:
    """The chunks of `shape` (each a box of (start, stop) per axis) that meet `box`."""
    box = box or [(0, n) for n in shape]
    ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(box, chunk, strict=True)]
    for at in itertools.product(*ranges):
        yield [(i * c, min((i + 1) * c, n)) for i, c, n in zip(at, chunk, shape, strict=True)]


def _store(dst: Any, index: tuple[slice, ...], values: np.ndarray) -> None:
    try:
        dst[index].write(values).result()
    except Exception as e:
        raise OSError(_why(e)) from None


class _Chunks:
    """Writes blocks into an array a whole chunk at a time: a block that fills a chunk
    only in part waits in that chunk's buffer until the rest arrives, so every chunk is
    written once and memory holds only chunks in progress."""

    def __init__(self, array: Any, chunk: tuple[int, ...], dtype: np.dtype) -> None:
        self.array, self.chunk, self.dtype = array, chunk, dtype
        self.shape = tuple(array.shape)
        self.pending: dict[tuple[int, ...], list] = {}  # chunk start -> [buffer, left]
        self.lock = threading.Lock()

    def write(self, values: np.ndarray, index: tuple[slice, ...]) -> None:
        box = [(s.start, s.stop) for s in index] + [(0, n) for n in self.shape[len(index) :]]
        values = values.view(self.dtype).reshape([hi - lo for lo, hi in box])
        for cbox in _grid(self.shape, self.chunk, box):
            part = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(box, cbox, strict=True)]
            src = values[
                tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(part, box, strict=True))
            ]
            if part == cbox:
                _store(self.array, tuple(slice(lo, hi) for lo, hi in cbox), src)
                continue
            start = tuple(c for c, _ in cbox)
            with self.lock:
                entry = self.pending.get(start)
                if entry is None:
                    shape = [d - c for c, d in cbox]
                    entry = self.pending[start] = [np.empty(shape, self.dtype), math.prod(shape)]
            entry[0][
                tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(part, cbox, strict=True))
            ] = src
            with self.lock:
                entry[1] -= src.size
                done = entry[1] == 0
                if done:
                    del self.pending[start]
            if done:
                _store(self.array, tuple(slice(lo, hi) for lo, hi in cbox), entry[0])
