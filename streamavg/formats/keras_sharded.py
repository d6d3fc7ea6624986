"""Sharded Keras weights: `model.save_weights("x.weights.json", max_shard_size=GB)`, and
KerasHub presets' `model.weights.json`. The manifest's `weight_map` names, for each group
of variables (`/layers/dense/vars`), the HDF5 shards beside it that hold its tensors
(`x_00000.weights.h5`, ...); `model.load_weights("x.weights.json")` reads them.

Each shard is read by the HDF5 reader. The output is a manifest and shards named as Keras
names them, sharded like the newest input; the shards are put in place first and the
manifest last, so no reader ever finds a manifest whose shards are not all there.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import posixpath
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import numpy as np

from .. import publish
from ..errors import WRITE_ERRORS, StreamavgError, UsageError
from ..remote import as_path
from . import hdf5, shard_index
from .base import (
    PROVENANCE_KEY,
    ReaderBase,
    Targets,
    Write,
    require_regular_file,
)
from .hdf5 import h5py

SUFFIXES = {"keras-sharded": ".weights.json"}
ACCEPTED = {"keras-sharded": (".weights.json",)}
MANIFEST = ".weights.json"
#: A manifest lists groups, so even a huge model's is small; a group may span shards.
MANIFESTS = shard_index.Kind(MANIFEST, "sharded-weights manifest", 64 << 20)
OPTIMIZER = "optimizer"  # the root group of the optimizer's state, in every shard


def claims(path: Path, head: bytes) -> bool:
    """A file named `*.weights.json` holding a JSON object (or nothing, which is refused
    as not JSON when opened); never a folder."""
    return path.name.endswith(MANIFEST) and path.is_file() and head.lstrip()[:1] in (b"{", b"")


def open_checkpoint(path: Path, *, optimizer: bool = False, like: Sharded | None = None) -> Sharded:
    return Sharded(path, optimizer=optimizer, like=like)


def averaged(path: Path) -> bool:
    """Whether the manifest at `path` records our provenance; only the manifest is read."""
    try:
        return PROVENANCE_KEY in shard_index.read(path, MANIFESTS).metadata
    except StreamavgError:
        return False


def parts(directory: Path) -> dict[str, Path]:
    """The shards that the manifests in `directory` list, each with its manifest."""
    return shard_index.parts(directory, MANIFESTS)


class Sharded(ReaderBase):
    """An open sharded checkpoint: one HDF5 reader per shard, in the order the manifest
    first names them, and the tensors of all, each read from the shard holding it.

    Only the model's tensors are listed unless `optimizer` is true. The manifest is
    checked against the shards: every listed shard there, no tensor in two shards, and
    each tensor in a shard that the weight_map lists for its group (where Keras looks).
    Each shard may share the listing of `like`'s shard of the same rank (see
    `hdf5.Checkpoint`), if built alike.
    """

    format = "keras-sharded"

    def __init__(
        self, path: str | os.PathLike, *, optimizer: bool = False, like: Sharded | None = None
    ) -> None:
        self.path = as_path(path)
        self._index = shard_index.read(self.path, MANIFESTS)
        if not self._index.weight_map:
            raise StreamavgError(
                f"{self.path}: corrupt {MANIFESTS.what} (its weight_map lists no shards)"
            )
        self.shards: list[hdf5.Checkpoint] = []
        self._owner: dict[str, hdf5.Checkpoint] = {}
        try:
            for k, name in enumerate(self._index.shards):
                twin = like.shards[k] if like is not None and k < len(like.shards) else None
                self.shards.append(self._open_shard(name, optimizer, twin))
            self._check_groups()
        except BaseException:
            self.close()
            raise
        self.tensors = {n: t for s in self.shards for n, t in s.tensors.items()}
        self.size = self._index.stat.st_size + sum(s.size for s in self.shards)
        self.open_files = len(self.shards)

    def _open_shard(
        self, name: str, optimizer: bool, like: hdf5.Checkpoint | None
    ) -> hdf5.Checkpoint:
        file = self.path.with_name(name)
        if not (file.exists() or file.is_symlink()):
            raise StreamavgError(
                f"{self.path}: {name}: missing "
                "(a damaged checkpoint: a manifest pointing at missing shards)"
            )
        require_regular_file(file)
        shard = hdf5.Checkpoint(file, optimizer=optimizer, format="keras-weights", like=like)
        for tensor in shard.tensors:
            if tensor in self._owner:
                shard.close()
                raise StreamavgError(
                    f"{self.path}: {tensor}: in two shards, {self._owner[tensor].path.name} "
                    f"and {name}"
                )
            self._owner[tensor] = shard
        return shard

    def _check_groups(self) -> None:
        """Every tensor in a shard listed for its group: Keras would not find it otherwise."""
        for tensor, shard in self._owner.items():
            group = "/" + posixpath.dirname(tensor)
            if shard.path.name not in self._index.weight_map.get(group, ()):
                raise StreamavgError(
                    f"{self.path}: {tensor}: in shard {shard.path.name}, which the "
                    f"weight_map does not list for {group}"
                )

    @property
    def files(self) -> list[str]:
        """The file names it spans: the manifest, then its shards."""
        return [self.path.name, *(s.path.name for s in self.shards)]

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        self._owner[name].read(name, index, out)

    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None:
        self._owner[name].prefetch(name, index, merge)

    def settle(self, release: bool) -> None:
        for shard in self.shards:
            shard.settle(release)

    def check_unchanged(self) -> None:
        self._index.check_unchanged()
        for shard in self.shards:
            shard.check_unchanged()

    @property
    def provenance(self) -> dict | None:
        found = self._index.metadata.get(PROVENANCE_KEY)
        return found if isinstance(found, dict) else None

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    @contextmanager
    def write_like(
        self,
        dest: Path,
        fresh: Collection[str],
        *,
        optimizer: bool,
        provenance: dict,
        overwrite: bool,
    ) -> Iterator[Write]:
        """Write a sharded checkpoint like this one: manifest `dest` and shards beside it,
        each laid out like this one's shard of the same rank (a shard that held only
        optimizer state goes with it, unless `optimizer`). All are staged under temporary
        names and made durable; an old manifest at `dest` (with `overwrite`) is removed,
        with the shards it alone lists, then the shards are moved into place, and the
        manifest last. On failure, the shards already moved are removed again. Runs
        publishing into one folder take turns (a lock on it), so that no run's shards end
        up under another's manifest."""
        fresh = set(fresh)
        kept = self._kept(optimizer)
        targets = {s: dest.with_name(_shard_name(dest, k)) for k, s in enumerate(kept)}
        _refuse_taken(dest, list(targets.values()), overwrite)
        manifest = self._manifest_like(targets, optimizer, provenance)
        moved: list[Path] = []
        with ExitStack() as lock, ExitStack() as stack:  # the lock is let go of last
            stack.enter_context(_removed_on_failure(moved))
            manifest_tmp = stack.enter_context(publish.atomic_output(dest, overwrite))
            tmps = {}
            for shard in reversed(kept):  # the last entered is moved first: shard 0
                need = sum(shard.tensors[n].nbytes for n in fresh & shard.tensors.keys())
                tmps[shard] = stack.enter_context(_moved(targets[shard], overwrite, need, moved))
            try:
                with self._shards_written(tmps, fresh, optimizer, provenance) as write:
                    yield write
                manifest_tmp.write_text(json.dumps(manifest, indent=4))
                _lock(dest.parent, until=lock)
                if overwrite:
                    _remove_old(dest, set(targets.values()))
            except WRITE_ERRORS as e:  # named for the output, not the shard it failed in
                raise StreamavgError(f"{dest}: cannot write ({publish.why(e)})") from None

    def _kept(self, optimizer: bool) -> list[hdf5.Checkpoint]:
        """The shards an output keeps: all, or those with model tensors."""
        return [
            s
            for s in self.shards
            if optimizer or any(t.part != "optimizer" for t in s.tensors.values())
        ]

    @contextmanager
    def _shards_written(
        self,
        paths: dict[hdf5.Checkpoint, Path],
        fresh: set[str],
        optimizer: bool,
        provenance: dict,
    ) -> Iterator[Write]:
        """Write each shard of `paths` like this one's shard, at its path there; yield
        `write`, which fills the `fresh` tensors in whichever shard holds them."""
        with ExitStack() as files:
            writers: dict[str, Write] = {}
            places: dict[str, tuple[Path, int]] = {}
            for shard, path in paths.items():
                mine = fresh & shard.tensors.keys()
                writer = files.enter_context(
                    hdf5.h5_like(shard, path, mine, optimizer=optimizer, provenance=provenance)
                )
                writers |= dict.fromkeys(mine, writer)
                places |= writer.targets.places

            def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
                writers[name](name, values, index)

            write.targets = Targets(places, None)  # each shard, its own file
            yield write

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        """The manifest at `tmp` and its shards beside it, in a folder being written (a
        KerasHub preset): named as Keras names them, each laid out like this one's."""
        kept = self._kept(optimizer)
        paths = {s: tmp.with_name(_shard_name(tmp, k)) for k, s in enumerate(kept)}
        with self._shards_written(paths, set(fresh), optimizer, provenance) as write:
            yield write
        tmp.write_text(json.dumps(self._manifest_like(paths, optimizer, provenance), indent=4))

    def _manifest_like(
        self, targets: dict[hdf5.Checkpoint, Path], optimizer: bool, provenance: dict
    ) -> dict:
        """This manifest for shards `targets`: their names in the weight_map (the
        optimizer's groups only if kept), total_size as Keras counts it (bits / 8 of every
        stored tensor, a float), and our provenance in the metadata."""
        names = {s.path.name: t.name for s, t in targets.items()}
        weight_map = {}
        for group, value in self._index.document["weight_map"].items():
            if not optimizer and group.strip("/").split("/")[0] == OPTIMIZER:
                continue
            mapped = [names[n] for n in self._index.weight_map[group] if n in names]
            if mapped:
                weight_map[group] = mapped if isinstance(value, list) else mapped[0]
        bits = sum(_stored_bits(s, optimizer) for s in targets)
        metadata = {
            **self._index.metadata,
            "total_size": bits / 8,
            PROVENANCE_KEY: provenance,
        }
        return {**self._index.document, "metadata": metadata, "weight_map": weight_map}


def _shard_name(manifest: Path, k: int) -> str:
    """Shard `k` of `manifest`, as Keras's ShardedH5IOStore names it: `x_00000.weights.h5`."""
    return f"{manifest.stem.replace('.weights', '')}_{k:05}.weights.h5"


def _stored_bits(shard: hdf5.Checkpoint, optimizer: bool) -> int:
    """The bits of the tensors an output shard copies from `shard`, as Keras counts them
    (`dtype_utils.dtype_size`: a bool is one bit)."""
    total = 0

    def add(name: str, obj: h5py.HLObject) -> None:
        nonlocal total
        kept = optimizer or name.split("/", 1)[0] != OPTIMIZER
        if kept and isinstance(obj, h5py.Dataset) and obj.shape is not None:
            total += math.prod(obj.shape) * (1 if obj.dtype.kind == "b" else obj.dtype.itemsize * 8)

    shard.h5.visititems(add)
    return total


def _refuse_taken(dest: Path, targets: list[Path], overwrite: bool) -> None:
    """Refuse shard names that another manifest beside `dest` lists (replacing them would
    damage that checkpoint, perhaps an input), folders, and without `overwrite` any
    existing file."""
    owners = parts(dest.parent) if dest.parent.is_dir() else {}
    for target in targets:
        owner = owners.get(target.name)
        if owner is not None and owner.name != dest.name:
            raise UsageError(f"{target}: a shard of {owner}; name the output otherwise")
        if target.is_dir() and not target.is_symlink():
            raise UsageError(f"{target}: is a directory")
        if not overwrite and (target.exists() or target.is_symlink()):
            raise publish.already_exists(target)


def _lock(folder: Path, *, until: ExitStack) -> None:
    """Wait for, then hold, an exclusive lock on `folder` until `until` closes."""
    fd = os.open(folder, os.O_RDONLY)
    until.callback(os.close, fd)  # closing the folder lets go of the lock
    fcntl.flock(fd, fcntl.LOCK_EX)


@contextmanager
def _moved(target: Path, overwrite: bool, need: int, moved: list[Path]) -> Iterator[Path]:
    """`publish.atomic_output` for one shard, noting in `moved` when it is in place."""
    with publish.atomic_output(target, overwrite, need=need) as tmp:
        yield tmp
    moved.append(target)


@contextmanager
def _removed_on_failure(moved: list[Path]) -> Iterator[None]:
    """Remove the shards in `moved` if the block fails: without their manifest they are
    of no use, and no later run would know them for leftovers."""
    try:
        yield
    except BaseException:
        for path in moved:
            with suppress(OSError):
                path.unlink()
        raise


def _remove_old(dest: Path, reused: set[Path]) -> None:
    """Remove the manifest at `dest`, durably, before any new shard takes its place, so
    that old and new shards are never loaded together; then the old shards that neither
    the new checkpoint nor another manifest beside it uses."""
    if not dest.exists():
        return
    try:
        old = shard_index.read(dest, MANIFESTS).shards
    except StreamavgError:
        old = []  # not a manifest we can read: it lists no shards we may remove
    dest.unlink()
    publish.sync(dest.parent)
    others = parts(dest.parent)
    for name in old:
        path = dest.with_name(name)
        if path not in reused and name not in others:
            path.unlink(missing_ok=True)
