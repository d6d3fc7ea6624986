"""Benchmark streamavg on every checkpoint container against a byte-exact read floor.

For every case (a model, a container and N checkpoints) this measures, side by side, the
wall time (median of --repeats runs) and peak RSS (os.wait4) of each method as a whole
process, as scripts/bench.py does:

  floor           a process that imports numpy and h5py, then reads exactly the bytes of
                  the tensors streamavg averages (the float model tensors: no optimizer
                  state, no integers) of every checkpoint, once, with os.preadv at known
                  offsets into one reused 4 MiB buffer: the reading any averaging has to do
  streamavg       python -m streamavg DIR -o OUT --overwrite --quiet
  streamavg-256M  the same with --max-memory 256M

  start-up        a process that only imports numpy and h5py: what both of the above pay
                  before any work

and reports streamavg/floor and streamavg-256M/floor, and the same for the time beyond
start-up ((streamavg - start-up) / (floor - start-up): the work of averaging against the
work of reading); streamavg's time includes writing and fsyncing its output, which the
floor's does not (bench.py's write-floor measures that).
The floor's (file, offset, size) list is made before any timing, independently of
streamavg, and handed to it in a JSON file: HDF5 datasets are located with h5py
(DatasetID.get_offset, or the chunks' offsets), inside a .keras archive at the offset of
the stored model.weights.h5 member's data (from its zip local header); safetensors offsets
come from the 8-byte header length and the JSON header; sharded containers are located
shard by shard. Orbax's zstd-compressed OCDBT store is not parsed: its floor reads the
whole data files, which hold the (small, plain SGD) optimizer state too. The list is made
in a spawned process, so that this one never imports numpy or h5py (a child's peak RSS
includes its parent's RSS at spawn).

Cases (--cases takes a comma list of names or fnmatch patterns, such as 'mlp-*'):

  resnet-keras-nN, resnet-weights.h5-nN
      many small tensors: keras.applications.ResNet50(weights=None), 320 tensors, about
      100 MB of float32 (built for 64x64 inputs: the weights do not depend on it), compiled
      with SGD(momentum=0.9) so that the momenta double the file, saved with model.save and
      model.save_weights, for every N in --n; N = 100 is skipped, saying why, unless the
      disk has room for the missing checkpoints plus 20%
  mlp-keras, mlp-weights.h5, mlp-keras-dir, mlp-weights.json, mlp-safetensors,
  mlp-safetensors-dir, mlp-orbax
      each container at N = 10, with bench.py's 38 MB MLP (plain SGD): .keras,
      .weights.h5, unzipped .keras folders (model.save(path, zipped=False)), Keras sharded
      weights (save_weights(path.weights.json, max_shard_size=0.01), 10.7 MB shards, the
      limit raised to the largest tensor, 12.6 MB, which Keras refuses to split), one
      .safetensors file (safetensors.numpy.save_file of the weights by variable path), a
      Hugging Face sharded folder (model.safetensors.index.json, {"metadata":
      {"total_size": N}, "weight_map": {name: shard}}, and model-0000K-of-0000M.safetensors
      shards of at most 10.7 MB, a larger tensor alone), and Orbax
      (keras.callbacks.OrbaxCheckpoint with the JAX backend), which runs only where
      `import orbax.checkpoint` works in this Python

Every checkpoint is the previous one plus small Gaussian noise on the trainable variables,
after one fitted step (so the optimizer state exists). Spawned processes write them (Keras
is never imported here) under WORKDIR/ckpts, one set per model and container, and later
runs reuse and extend them; a case's directory WORKDIR/runs/CASE links its newest N. Before
each case, every set is evicted from the page cache and the case's files are read once,
when they fit in available memory; before each run, os.sync() finishes any write-back left
by the run before. A method that fails is not run again for that case: its error goes in
the table. Results go to WORKDIR/results.json and WORKDIR/report.md (also printed).

Every case (many minutes; N = 100 needs about 45 GB of disk):
    .venv/bin/python scripts/bench_formats.py
Only the N = 10 cases, three runs each:
    .venv/bin/python scripts/bench_formats.py --n 10 --repeats 3
Quick check (a convnet of 122 small tensors and a 1 MB MLP, 256 KiB shards):
    .venv/bin/python scripts/bench_formats.py --quick --workdir /tmp/bench-formats-tiny \
        --n 3,12 --repeats 2
"""

import argparse
import fnmatch
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import (
    GIB,
    HIDDEN,
    IN_DIM,
    MAX_MEMORY,
    OUT_DIM,
    describe,
    meminfo,
    mlp_width,
    number_list,
    ok,
    ratio,
    run_methods,
    summarize,
)

SCRIPTS = Path(__file__).resolve().parent
METHODS = ("start-up", "floor", "streamavg", f"streamavg-{MAX_MEMORY}")
CONTAINER_N = 10  # checkpoints in every per-container case
NOISE = 1e-3  # standard deviation of the noise added from one checkpoint to the next
DISK_SLACK = 1.2  # N = 100 is generated only if the disk has room for it plus 20%
SEED = 0
FLOOR_BUFFER = 4 << 20  # bytes: the floor reads larger tensors in pieces of this size
# The floor: every (offset, size) of the plan, file by file, into one reused buffer. It
# imports numpy and h5py as streamavg does, so that both pay the same start-up.
FLOOR = f"""
import json, os, sys

import h5py  # noqa: F401
import numpy as np

with open(sys.argv[1]) as f:
    plan = json.load(f)
largest = max((size for _, reads in plan["files"] for _, size in reads), default=0)
view = memoryview(np.empty(min(largest, {FLOOR_BUFFER}), np.uint8))
for path, reads in plan["files"]:
    fd = os.open(path, os.O_RDONLY)
    for offset, size in reads:
        done = 0
        while done < size:
            n = os.preadv(fd, [view[: min(size - done, len(view))]], offset + done)
            if not n:
                sys.exit(f"{{path}}: ends before {{offset + size}}")
            done += n
    os.close(fd)
"""


@dataclass(frozen=True)
class Container:
    """How one container is written and named: `suffix` of a checkpoint ("" for a folder;
    Orbax's are step folders named by the epoch alone) and `output` of the average."""

    name: str
    suffix: str
    output: str


CONTAINERS = {
    c.name: c
    for c in (
        Container("keras", ".keras", "avg.keras"),
        Container("weights.h5", ".weights.h5", "avg.weights.h5"),
        Container("keras-dir", "", "avg"),
        Container("weights.json", ".weights.json", "avg.weights.json"),
        Container("safetensors", ".safetensors", "avg.safetensors"),
        Container("safetensors-dir", "", "avg"),
        Container("orbax", "", "avg"),
    )
}
RESNET_CONTAINERS = ("keras", "weights.h5")


@dataclass(frozen=True)
class Case:
    """One measurement: `n` checkpoints of `model` ("resnet" or "mlp") in `container`."""

    model: str
    container: str
    n: int

    @property
    def name(self) -> str:
        tail = f"-n{self.n}" if self.model == "resnet" else ""
        return f"{self.model}-{self.container}{tail}"

    @property
    def set_name(self) -> str:
        return f"{self.model}-{self.container}"


def model_label(model: str, quick: bool) -> str:
    """What `model` is, in words, for the report."""
    if model == "resnet":
        return "tiny convnet (quick)" if quick else "ResNet50"
    return f"MLP {mlp_mb(quick):g} MB"


def mlp_mb(quick: bool) -> float:
    return 1 if quick else 38


def shard_bytes(quick: bool) -> int:
    """The largest shard of the sharded containers: 0.01 GB as Keras counts (10.7 MB), or
    256 KiB for --quick."""
    return GIB // 4096 if quick else GIB // 100


def estimated_bytes(case: Case, quick: bool) -> float:
    """A checkpoint's size before any is written: the floats, twice with momenta."""
    if case.model == "resnet":
        return 50e3 if quick else 206e6
    return mlp_mb(quick) * 1.05e6


# --- Writing checkpoints (in spawned processes: Keras is never imported here) ---------------


def build_model(model: str, quick: bool):
    """The compiled Keras model, fitted one step on a tiny batch so its optimizer has state."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    if model == "resnet":
        if quick:  # many small tensors: 24 conv + batch-norm blocks of 8 channels
            x = inputs = keras.Input((16, 16, 3))
            for _ in range(24):
                x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
                x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
            x = keras.layers.GlobalAveragePooling2D()(x)
            net = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
        else:
            net = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
        # Eagerly: tracing ResNet50's train step for one step takes most of a minute.
        net.compile(
            keras.optimizers.SGD(momentum=0.9), "categorical_crossentropy", run_eagerly=True
        )
        shape, classes = net.input_shape[1:], net.output_shape[-1]
        x = rng.normal(size=(2, *shape)).astype("float32")
        y = np.eye(classes, dtype="float32")[rng.integers(classes, size=2)]
        net.fit(x, y, batch_size=2, verbose=0)
        return net
    width = mlp_width(mlp_mb(quick))  # bench.py's MLP and its plain SGD
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(HIDDEN)]
    net = keras.Sequential([keras.Input((IN_DIM,)), *layers, keras.layers.Dense(OUT_DIM)])
    net.compile(optimizer="sgd", loss="mse")
    x = rng.normal(size=(32, IN_DIM)).astype("float32")
    net.fit(x, rng.normal(size=(32, OUT_DIM)).astype("float32"), batch_size=32, verbose=0)
    return net


def save_safetensors_shards(weights: dict, folder: Path, limit: int) -> None:
    """A Hugging Face sharded folder, as transformers writes one: shards of at most
    `limit` bytes (a larger tensor alone) and model.safetensors.index.json."""
    from safetensors.numpy import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, value in weights.items():
        if shards[-1] and size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "np"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save(net, container: str, directory: Path, epoch: int, quick: bool, orbax=None) -> None:
    """Write checkpoint `epoch` of `net` into `directory` as `container`."""
    import numpy as np
    from safetensors.numpy import save_file

    path = directory / checkpoint_name(container, epoch)
    if path.is_dir():
        shutil.rmtree(path)  # left half-written by an interrupted run
    if container == "keras":
        net.save(path)
    elif container == "weights.h5":
        net.save_weights(path)
    elif container == "keras-dir":
        net.save(path, zipped=False)
    elif container == "weights.json":
        # Keras refuses a tensor larger than a shard (the MLP's kernels are 12.6 MB).
        largest = max(np.dtype(v.dtype).itemsize * math.prod(v.shape) for v in net.weights)
        net.save_weights(path, max_shard_size=max(shard_bytes(quick), largest) / GIB)
    elif container in ("safetensors", "safetensors-dir"):
        weights = {v.path: np.asarray(v.numpy()) for v in net.weights}
        if container == "safetensors":
            save_file(weights, path, metadata={"format": "np"})
        else:
            path.mkdir()
            save_safetensors_shards(weights, path, shard_bytes(quick))
    elif container == "orbax":
        orbax.on_epoch_end(epoch)  # step folder `epoch` in the callback's directory
    else:
        raise ValueError(container)


def write_checkpoints(model: str, quick: bool, jobs: list[tuple[str, str, int, int]]) -> None:
    """For each job (container, set directory, have, want), write checkpoints have+1..want:
    checkpoint e is checkpoint e-1 plus N(0, NOISE) on every trainable variable, the noise
    drawn from a generator seeded with e, so sets extended later stay one chain."""
    if any(container == "orbax" for container, *_ in jobs):
        os.environ["KERAS_BACKEND"] = "jax"  # OrbaxCheckpoint writes the JAX state tree
    import keras
    import numpy as np

    net = build_model(model, quick)
    variables = net.trainable_variables
    values = [np.asarray(v.numpy()) for v in variables]
    callbacks = {}
    for container, directory, _, _ in jobs:
        if container == "orbax":
            callbacks[directory] = keras.callbacks.OrbaxCheckpoint(
                directory, max_to_keep=None, save_on_background=False
            )
            callbacks[directory].set_model(net)
    for epoch in range(1, max(want for *_, want in jobs) + 1):
        rng = np.random.default_rng([SEED, epoch])
        for value in values:
            value += NOISE * rng.standard_normal(value.shape, np.float32)
        todo = [(c, Path(d), want) for c, d, have, want in jobs if have < epoch <= want]
        if not todo:
            continue
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        for container, directory, want in todo:
            save(net, container, directory, epoch, quick, callbacks.get(str(directory)))
            meta = json.loads(set_meta(directory).read_text())
            set_meta(directory).write_text(json.dumps({**meta, "count": epoch}))
            print(f"generated {directory.name} {epoch}/{want}", file=sys.stderr, flush=True)
    for callback in callbacks.values():
        callback.on_train_end()


def checkpoint_name(container: str, epoch: int) -> str:
    """The name of a set's checkpoint `epoch` (the manifest, for sharded weights)."""
    if container == "orbax":
        return str(epoch)
    return f"model_{epoch:03d}{CONTAINERS[container].suffix}"


def set_meta(directory: Path) -> Path:
    return directory.with_name(directory.name + ".meta.json")


def set_count(directory: Path, spec: dict) -> int:
    """How many checkpoints the set at `directory` holds; clears a set of another spec."""
    meta = set_meta(directory)
    if meta.exists():
        cached = json.loads(meta.read_text())
        if {k: v for k, v in cached.items() if k != "count"} == spec and directory.is_dir():
            return cached["count"]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    meta.write_text(json.dumps({**spec, "count": 0}))
    return 0


def spawn(target, *args) -> None:
    """Run `target(*args)` in a spawned process (no module of this one is inherited)."""
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"{target.__name__} failed (exit code {proc.exitcode})")


def tree_bytes(path: Path) -> int:
    """Bytes of the files at `path` (a file, or a folder's files, links followed)."""
    return sum(p.stat().st_size for p in files_under(path))


def files_under(path: Path) -> list[Path]:
    """`path` if a file, else every file below it; links resolved, each file once."""
    path = path.resolve()
    if not path.is_dir():
        return [path]
    found = []
    for root, _, names in os.walk(path, followlinks=True):
        found += [Path(root, name).resolve() for name in sorted(names)]
    return list(dict.fromkeys(found))


def generate(cases: list[Case], ckpts: Path, quick: bool) -> dict[str, str]:
    """Ensure every case's set holds its N checkpoints, level by level (the smallest N of
    every set first), skipping a level the disk has no room for (plus 20%). Returns the
    skipped cases' reasons, by name."""
    needs: dict[str, set[int]] = {}
    for case in cases:
        needs.setdefault(case.set_name, set()).add(case.n)
    by_set = {case.set_name: case for case in cases}
    skipped: dict[str, str] = {}
    for level in sorted({n for ns in needs.values() for n in ns}):
        jobs: dict[tuple[str, bool], list] = {}
        free = shutil.disk_usage(ckpts).free
        for set_name, ns in needs.items():
            if level not in ns:
                continue
            case = by_set[set_name]
            directory = ckpts / set_name
            spec = {"model": case.model, "container": case.container, "quick": quick}
            have = set_count(directory, spec)
            if have >= level:
                continue
            each = tree_bytes(directory) / have if have else estimated_bytes(case, quick)
            need = (level - have + 1) * each * DISK_SLACK  # +1: the average written
            if need > free:
                reason = (
                    f"needs {need / 1e9:.3g} GB of disk for {level - have} more checkpoints "
                    f"(plus 20%), {free / 1e9:.3g} GB free"
                )
                for c in cases:
                    if c.set_name == set_name and c.n >= level:
                        skipped[c.name] = reason
                continue
            free -= need
            key = (case.model, case.container == "orbax")  # Orbax sets need the JAX backend
            jobs.setdefault(key, []).append((case.container, str(directory), have, level))
        for (model, _), model_jobs in jobs.items():
            spawn(write_checkpoints, model, quick, model_jobs)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return skipped


def link_newest(case: Case, ckpts: Path, runs: Path) -> Path:
    """Fill WORKDIR/runs/CASE with links to the entries of the set's newest N checkpoints
    (a sharded checkpoint's manifest and its shards). Returns the folder."""
    target = runs / case.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    directory = ckpts / case.set_name
    count = json.loads(set_meta(directory).read_text())["count"]
    newest = range(count - case.n + 1, count + 1)
    for entry in sorted(directory.iterdir()):
        if epoch_of(entry.name) in newest:
            (target / entry.name).symlink_to(entry.resolve())
    return target


def epoch_of(name: str) -> int | None:
    """The epoch of a set's entry (`model_007.keras`, a shard `model_007_00000.weights.h5`,
    Orbax's step `7`), or None for anything else (Orbax's unfinished `7.orbax-...-tmp`)."""
    found = re.fullmatch(r"(?:model_)?(\d+)(?:[._].*)?", name)
    return int(found[1]) if found and "tmp" not in name else None


def is_shard(name: str) -> bool:
    """Whether `name` is a shard of sharded Keras weights, which its manifest lists."""
    return re.search(r"_\d{5}\.weights\.h5$", name) is not None


def checkpoints_of(case: Case, run: Path) -> list[Path]:
    """The case's checkpoints in `run` (manifests, not shards), oldest first, resolved."""
    names = sorted((e.name for e in run.iterdir() if not is_shard(e.name)), key=epoch_of)
    if len(names) != case.n:
        raise RuntimeError(f"{run}: {len(names)} checkpoints, not {case.n}")
    return [(run / name).resolve() for name in names]


# --- The floor's reading plan (in a spawned process: h5py is never imported here) ----------


def hdf5_reads(path: Path, base: int = 0, window: tuple[int, int] | None = None) -> list:
    """(offset, size) of every stored piece of every float dataset of the HDF5 file at
    `path` but those under its root group `optimizer`; `window` (start, size) says the file
    is a member of an archive, its offsets counted from `start`."""
    import io

    import h5py

    class Window(io.RawIOBase):
        """The bytes start..start+size of a file, as a file object of its own."""

        def __init__(self, f, start: int, size: int) -> None:
            self.f, self.start, self.size, self.pos = f, start, size, 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
            self.pos = (0, self.pos, self.size)[whence] + offset
            return self.pos

        def readinto(self, buf) -> int:
            self.f.seek(self.start + self.pos)
            view = memoryview(buf).cast("B")[: max(0, self.size - self.pos)]
            n = self.f.readinto(view)
            self.pos += n
            return n

    reads = []

    def visit(name: str, obj) -> None:
        if name.split("/")[0] == "optimizer" or not isinstance(obj, h5py.Dataset):
            return
        if obj.dtype.kind != "f" or not obj.size:
            return
        dsid = obj.id
        layout = dsid.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            reads.append((base + dsid.get_offset(), dsid.get_storage_size()))
        elif layout == h5py.h5d.CHUNKED:
            for i in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(i)
                reads.append((base + info.byte_offset, info.size))
        else:
            raise ValueError(f"{path}: {name}: neither contiguous nor chunked")

    with open(path, "rb") as raw:
        source = Window(raw, *window) if window else raw
        with h5py.File(source, "r") as f:
            f.visititems(visit)
    return reads


def keras_member(path: Path) -> tuple[int, int]:
    """(start, size) of the data of the stored model.weights.h5 member of a .keras archive,
    from its zip local header (30 bytes, then the name and the extra field)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: model.weights.h5 is compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: no local header at {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def safetensors_reads(path: Path) -> list:
    """(offset, size) of every float tensor of a .safetensors file, from its header."""
    import struct

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    reads = []
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"].startswith(("F", "BF")):
            begin, end = info["data_offsets"]
            if end > begin:
                reads.append((8 + length + begin, end - begin))
    return reads


def checkpoint_reads(container: str, path: Path) -> dict[Path, list]:
    """The floor's reads of one checkpoint, by file."""
    if container == "keras":
        start, size = keras_member(path)
        return {path: hdf5_reads(path, base=start, window=(start, size))}
    if container == "weights.h5":
        return {path: hdf5_reads(path)}
    if container == "keras-dir":
        return {path / "model.weights.h5": hdf5_reads(path / "model.weights.h5")}
    if container == "weights.json":
        weight_map = json.loads(path.read_text())["weight_map"]
        shards = {s for v in weight_map.values() for s in ([v] if isinstance(v, str) else v)}
        return {path.parent / s: hdf5_reads(path.parent / s) for s in sorted(shards)}
    if container == "safetensors":
        return {path: safetensors_reads(path)}
    if container == "safetensors-dir":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        return {
            path / s: safetensors_reads(path / s) for s in sorted(set(index["weight_map"].values()))
        }
    if container == "orbax":  # OCDBT's data files, whole
        data = [p for p in files_under(path / "pytree") if p.parent.name == "d"]
        return {p: [(0, p.stat().st_size)] for p in data}
    raise ValueError(container)


def write_plans(jobs: list[tuple[str, list[str], str]]) -> None:
    """For each job (container, checkpoints oldest first, JSON path), write the floor's
    plan: every file with its reads in the order of their offsets, and the totals."""
    for container, paths, out in jobs:
        files, tensors = [], 0
        for path in map(Path, paths):
            for file, reads in checkpoint_reads(container, path).items():
                files.append([str(file), sorted(reads)])
                tensors += len(reads)
        total = sum(size for _, reads in files for _, size in reads)
        plan = {"files": files, "pieces": tensors, "bytes": total}
        Path(out).write_text(json.dumps(plan))


# --- Measuring ------------------------------------------------------------------------------


def evict(ckpts: Path) -> None:
    """Drop every generated checkpoint from the page cache (posix_fadvise: no privileges)."""
    for path in files_under(ckpts):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    """Read every file once so that timings start from a warm page cache."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def commands(case: Case, run: Path, plan: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    output = out / CONTAINERS[case.container].output
    streamavg = [py, "-m", "streamavg", str(run), "-o", str(output), "--overwrite", "--quiet"]
    return {
        "start-up": [py, "-c", "import h5py, numpy"],
        "floor": [py, "-c", FLOOR, str(plan)],
        "streamavg": streamavg,
        f"streamavg-{MAX_MEMORY}": [*streamavg, "--max-memory", MAX_MEMORY],
    }


def measure_case(case: Case, run: Path, plan: Path, workdir: Path, repeats: int) -> dict:
    """Warm the cache if the case fits, and run every method `repeats` times, interleaved."""
    files = files_under(run)  # every file of the case's checkpoints, links followed
    set_bytes = sum(f.stat().st_size for f in files)
    evict(workdir / "ckpts")
    cache = "warm" if set_bytes + GIB <= meminfo("MemAvailable") else "cold/partial cache"
    if cache == "warm":
        warm(files)
    info = json.loads(plan.read_text())
    print(
        f"{case.name}: {set_bytes / 1e6:.0f} MB on disk, floor reads "
        f"{info['bytes'] / 1e6:.0f} MB in {info['pieces']} pieces, {cache}",
        file=sys.stderr,
        flush=True,
    )
    out = workdir / "out"
    cmds = commands(case, run, plan, out)
    runs: dict[str, list[dict]] = {m: [] for m in cmds}
    run_methods(cmds, runs, repeats, out)
    methods = {m: summarize(r) for m, r in runs.items()}
    for method, res in methods.items():
        wall, rss, note = describe(res)
        print(f"  {method}: {wall} s, {rss} MiB {note}".rstrip(), file=sys.stderr, flush=True)
    return {
        "case": case.name,
        "model": case.model,
        "container": case.container,
        "n": case.n,
        "set_bytes": set_bytes,
        "floor_bytes": info["bytes"],
        "floor_pieces": info["pieces"],
        "cache": cache,
        "methods": methods,
    }


def error_note(res: dict) -> str:
    """A failed method's last line of stderr, fit for a table cell."""
    if res["ok"]:
        return ""
    if "skipped" in res:
        return res["skipped"]
    last = res["runs"][-1]
    line = last["stderr"][-1] if last["stderr"] else f"rc={last['rc']}"
    return line.replace("|", "\\|")


def report(header: str, results: list[dict], skipped: dict[str, str]) -> str:
    """Markdown: per case, the medians of every method and their ratios to the floor."""
    bounded = f"streamavg-{MAX_MEMORY}"
    lines = [
        header,
        "",
        "| case | model | N | floor MB/ckpt | disk MB/ckpt | cache | start-up s | floor s "
        f"| streamavg s | {bounded} s | time streamavg/floor | time {MAX_MEMORY}/floor "
        "| beyond start-up: streamavg/floor | RSS floor MiB | RSS streamavg MiB "
        f"| RSS {MAX_MEMORY} MiB | note |",
        "|---" * 17 + "|",
    ]
    for r in results:
        start, floor, sa, bd = (ok(r, m) for m in METHODS)
        cells = {m: describe(r["methods"][m]) for m in METHODS}
        notes = [f"{m}: {n}" for m in METHODS if (n := error_note(r["methods"][m]))]
        lines.append(
            f"| {r['case']} | {r['label']} | {r['n']} | {r['floor_bytes'] / r['n'] / 1e6:.1f} "
            f"| {r['set_bytes'] / r['n'] / 1e6:.1f} | {r['cache']} "
            f"| {' | '.join(cells[m][0] for m in METHODS)} "
            f"| {ratio(sa, floor, 'wall_s')} | {ratio(bd, floor, 'wall_s')} "
            f"| {beyond(sa, floor, start)} "
            f"| {' | '.join(cells[m][1] for m in METHODS[1:])} | {'; '.join(notes)} |"
        )
    for name, reason in skipped.items():
        lines.append(f"| {name} |" + " |" * 15 + f" skipped: {reason} |")
    return "\n".join(lines)


def beyond(num: dict | None, den: dict | None, start: dict | None) -> str:
    """(num - start) / (den - start) in wall time: the work past importing numpy and h5py."""
    if not (num and den and start) or den["wall_s"] <= start["wall_s"]:
        return "n/a"
    return f"{(num['wall_s'] - start['wall_s']) / (den['wall_s'] - start['wall_s']):.2f}x"


def all_cases(ns: list[int]) -> list[Case]:
    resnet = [Case("resnet", c, n) for n in ns for c in RESNET_CONTAINERS]
    return resnet + [Case("mlp", c, CONTAINER_N) for c in CONTAINERS]


def main() -> None:
    """Parse options, generate checkpoints, plan the floor, measure every case, report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/formats"))
    parser.add_argument("--repeats", type=int, default=5, help="runs per method (median)")
    parser.add_argument(
        "--n",
        type=number_list(int),
        default=[10, 100],
        help="checkpoint counts of the ResNet cases (default 10,100)",
    )
    parser.add_argument(
        "--cases",
        type=lambda text: text.split(","),
        help="comma list of case names or patterns (default: all); see the list above",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models for a smoke run (a separate set)"
    )
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}", file=sys.stderr, flush=True)

    cases = all_cases(args.n)
    if args.cases:
        unknown = [p for p in args.cases if not fnmatch.filter([c.name for c in cases], p)]
        if unknown:
            names = ", ".join(c.name for c in cases)
            parser.error(f"--cases: {', '.join(unknown)} matches no case (cases: {names})")
        cases = [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in args.cases)]
    skipped: dict[str, str] = {}
    if any(c.container == "orbax" for c in cases):
        probe = [sys.executable, "-c", "import orbax.checkpoint"]
        if subprocess.run(probe, capture_output=True).returncode:
            reason = f"`import orbax.checkpoint` fails in {sys.executable}"
            print(f"skipped mlp-orbax: {reason}", file=sys.stderr)
            skipped |= {c.name: reason for c in cases if c.container == "orbax"}
            cases = [c for c in cases if c.container != "orbax"]

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # inherited by every subprocess
    # Byte-compile streamavg as a regular install does (see bench.py).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(SCRIPTS.parent / "streamavg")], check=True
    )
    ckpts, runs = args.workdir / "ckpts", args.workdir / "runs"
    ckpts.mkdir(parents=True, exist_ok=True)
    skipped |= generate(cases, ckpts, args.quick)
    cases = [c for c in cases if c.name not in skipped]

    dirs = {c: link_newest(c, ckpts, runs) for c in cases}
    plans = {c: runs / f"{c.name}.floor.json" for c in cases}
    jobs = [
        (c.container, [str(p) for p in checkpoints_of(c, dirs[c])], str(plans[c])) for c in cases
    ]
    spawn(write_plans, jobs)

    results = []
    for case in cases:
        result = measure_case(case, dirs[case], plans[case], args.workdir, args.repeats)
        results.append({**result, "label": model_label(case.model, args.quick)})
    info = {
        "command": command,
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo("MemTotal") // 2**20,
        "repeats": args.repeats,
        "max_memory": MAX_MEMORY,
        "quick": args.quick,
    }
    results_json = {**info, "cases": results, "skipped": skipped}
    (args.workdir / "results.json").write_text(json.dumps(results_json, indent=2))
    header = (
        f"`{command}`: {info['cpus']} CPUs, {info['mem_total_mib']} MiB memory, "
        f"median of {args.repeats} runs"
    )
    text = report(header, results, skipped)
    (args.workdir / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
