"""Checkpoint folders as their tools' loaders take them: one or more weights files (each
possibly sharded), and the files that travel with them.

- `keras-dir`: an unzipped `.keras` model (`model.save(path, zipped=False)`): config.json,
  metadata.json, model.weights.h5; `keras.models.load_model(path)` reads it.
- `keras-hub`: a KerasHub preset (`save_to_preset`): the backbone's model.weights.h5 (or
  model.weights.json and its shards), a task's task.weights.h5, configs, tokenizer and
  assets/; `keras_hub.models.*.from_preset(path)` reads it.
- `huggingface`: a `save_pretrained` folder or a Trainer's `checkpoint-N`: model.safetensors
  (or an index and its shards), config and tokenizer files; `from_pretrained(path)`.
- `peft`: a PEFT adapter, adapter_model.safetensors and adapter_config.json;
  `PeftModel.from_pretrained(base, path)`.
- `accelerate`: an `accelerate.save_state` folder of one model (model.safetensors beside
  optimizer, scheduler and RNG state); one of several models is refused.

Every weights file is averaged, by its own adapter, with its namesake in every other
checkpoint; one that cannot be (a pickle: never unpickled) is refused, never copied. The
other files are companions (`base.Companion`): copied from the newest, those that give the
weights their meaning compared first (`streamavg.companions`); training state (optimizer,
scheduler, RNG) is left out unless the newest's optimizer state is kept. The output is a
folder laid out like the newest, published whole.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from ..errors import StreamavgError
from ..remote import as_path
from . import hdf5, keras_sharded, safetensors
from .base import Companion, Reader, ReaderBase, Targets, Write, file_companion, stat_of

SUFFIXES = {"keras-dir": "", "keras-hub": "", "huggingface": "", "peft": "", "accelerate": ""}
ACCEPTED: dict[str, tuple[str, ...]] = {}
#: Files that make a folder one checkpoint, beside a weights file its loader reads by name.
MARKERS = ("config.json", "adapter_config.json")
LOADED = (
    "model.weights.h5",
    "model.weights.json",
    "task.weights.h5",
    "model.safetensors",
    "adapter_model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",  # pickles: such a folder is refused, naming them
    "adapter_model.bin",
)
INDEX = safetensors.INDEX_SUFFIX
SHARD = re.compile(r"-\d+-of-\d+\.safetensors$")  # as Hugging Face names a shard
ACCELERATE = re.compile(r"random_states_\d+\.pkl")  # accelerate.save_state's RNG state
#: Training state (Trainer, accelerate, DeepSpeed): left out of an average.
STATE = re.compile(
    r"(optimizer|scheduler|scaler|sampler|dl_state_dict)[^/]*\.(pt|bin)|rng_state[^/]*\.pth"
    r"|(random_states|custom_checkpoint)_\d+\.pkl|trainer_state\.json|training_args\.bin"
    r"|(global_step\d+|optimizer_\d+)/.*|latest|zero_to_fp32\.py"
)
#: Companions taken from the newest without comparing: they do not change what weights mean.
COPIED = re.compile(r"(.*/)?(README\.md|generation_config\.json|\.gitattributes)")
#: Names of weights that no adapter reads: refused, as they would be neither averaged nor copied.
WEIGHTS_LIKE = (".safetensors", ".h5", ".hdf5", ".keras", ".bin", ".pt", ".pth", ".ckpt")
WEIGHTS_LIKE += (".msgpack", ".gguf", ".onnx", ".pkl", ".npz", ".distcp")


def kind(path: Path) -> str | None:
    """The kind of checkpoint folder `path` is, from the names of its files; None if it is
    not one (a folder of checkpoints, say)."""
    try:
        names = {p.name for p in path.iterdir() if p.is_file()}
    except OSError:
        return None
    indexed = any(n.endswith(INDEX) for n in names)
    if any(map(ACCELERATE.fullmatch, names)) and names & set(LOADED):
        return "accelerate"
    if not (indexed or names & set(MARKERS)) or not (indexed or names & set(LOADED)):
        return None
    if "adapter_config.json" in names:
        return "peft"
    if names & {"model.weights.h5", "model.weights.json"}:
        return "keras-hub" if _keras_hub(path / "metadata.json") else "keras-dir"
    return "huggingface"


def _keras_hub(metadata: Path) -> bool:
    """Whether a Keras folder's metadata.json was written by KerasHub."""
    try:
        return "keras_hub_version" in json.loads(metadata.read_bytes())
    except (OSError, ValueError):
        return False


def claims(path: Path, head: bytes) -> bool:
    return not head and path.is_dir() and kind(path) is not None


def missing(path: Path) -> str | None:
    """Why folder `path`, which is no checkpoint, looks like one still being written (a
    marker or training state, but no weights; shards without their index); else None."""
    try:
        names = sorted(p.name for p in path.iterdir() if p.is_file())
    except OSError:
        return None
    marked = set(names) & set(MARKERS) or any(STATE.fullmatch(n) for n in names)
    shards = [n for n in names if SHARD.search(n)]
    checkpoints = [n for n in names if n.endswith(WEIGHTS_LIKE) and n not in shards]
    if not marked or kind(path) is not None or any(not STATE.fullmatch(n) for n in checkpoints):
        return None  # a folder of checkpoints, perhaps with a config beside them
    if shards:
        return f"holds shards ({shards[0]}, ...) but no index: still being written?"
    return f"no weights file (only {', '.join(names)}): still being written?"


def open_checkpoint(path: Path, *, optimizer: bool = False, like: Folder | None = None) -> Folder:
    return Folder(path, optimizer=optimizer, like=like)


def averaged(path: Path) -> bool:
    """Whether `path` is an earlier streamavg output: each weights file of ours records it,
    shards too, so only the first one's header or attributes are read, nothing listed."""
    for p in sorted(path.iterdir()):
        if p.name.endswith(safetensors.SUFFIX) and p.is_file():
            return safetensors.averaged(p)
        if p.name.endswith(".weights.h5") and p.is_file():
            return hdf5.averaged(p)
    return False


class Folder(ReaderBase):
    """An open checkpoint folder: each weights file opened by its adapter, and its tensors
    under their own names (with one weights file) or as `FILE/NAME` (with several)."""

    folder = True

    def __init__(
        self, path: str | os.PathLike, *, optimizer: bool = False, like: Folder | None = None
    ) -> None:
        self.path = as_path(path)
        stat_of(self.path)
        found = kind(self.path)
        if found is None:
            raise StreamavgError(f"{self.path}: not a checkpoint folder (no weights file)")
        self.format = found
        self.members: dict[str, Reader] = {}
        if found == "accelerate":
            _one_model(self.path)
        try:
            self._open_members(optimizer, like)
            self._companions = self._find_companions()
        except BaseException:
            self.close()
            raise
        several = len(self.members) > 1
        self._owner: dict[str, tuple[Reader, str]] = {}
        self.tensors = {}
        for member, ck in self.members.items():
            for name, t in ck.tensors.items():
                key = f"{member}/{name}" if several else name
                self._owner[key] = ck, name
                self.tensors[key] = t._replace(name=key)
        self.size = sum(ck.size for ck in self.members.values())
        self.open_files = sum(ck.open_files for ck in self.members.values())

    def _open_members(self, optimizer: bool, like: Folder | None) -> None:
        """Open the sharded weights (indexes, manifests) first, so that their shards are
        known, then every other weights file."""
        names = sorted(p.name for p in self.path.iterdir() if p.is_file())
        owned: dict[str, str] = {}
        sharded = [n for n in names if n.endswith((INDEX, keras_sharded.MANIFEST))]
        for name in sharded:
            ck = self._open(name, optimizer, like)
            for part in ck.files[1:]:
                if part in owned:
                    raise StreamavgError(
                        f"{self.path / part}: listed by both {owned[part]} and {name}"
                    )
                owned[part] = name
        for name in names:
            if name not in owned and name.endswith((safetensors.SUFFIX, ".weights.h5")):
                self._open(name, optimizer, like)
        self._owned = set(owned)

    def _open(self, name: str, optimizer: bool, like: Folder | None) -> Reader:
        file, twin = self.path / name, like.members.get(name) if like is not None else None
        if name.endswith(INDEX):
            ck: Reader = safetensors.Sharded(file)
        elif name.endswith(keras_sharded.MANIFEST):
            ck = keras_sharded.Sharded(file, optimizer=optimizer, like=twin)
        elif name.endswith(safetensors.SUFFIX):
            ck = safetensors.Checkpoint(file)
        else:
            ck = hdf5.Checkpoint(file, optimizer=optimizer, format="keras-weights", like=twin)
        self.members[name] = ck
        return ck

    def _find_companions(self) -> list[Companion]:
        """Every other file, by its name in the folder, and what an average does with it;
        a weights file no adapter reads is refused."""
        found = []
        for p in sorted(self.path.rglob("*")):
            name = p.relative_to(self.path).as_posix()
            if name in self.members or name in self._owned or not p.is_file():
                continue
            if STATE.fullmatch(name):
                role = "state"
            elif name.endswith(WEIGHTS_LIKE):
                raise StreamavgError(
                    f"{p}: a weights file that streamavg cannot average (it reads .safetensors "
                    "and Keras's .weights.h5 and .weights.json; pickles are never unpickled), "
                    "and would not copy from the newest"
                )
            else:
                role = "copy" if COPIED.fullmatch(name) else "meaning"
            found.append(file_companion(p, name, role))
        return found

    def companions(self) -> list[Companion]:
        return self._companions

    @property
    def files(self) -> list[str]:
        """The weights files it reads: each member's, shards included."""
        return [
            part for ck in self.members.values() for part in getattr(ck, "parts", [ck.path.name])
        ]

    def read(self, name: str, index: tuple[slice, ...], out: np.ndarray) -> None:
        ck, inner = self._owner[name]
        ck.read(inner, index, out)

    def prefetch(self, name: str, index: tuple[slice, ...], merge: int = 0) -> None:
        ck, inner = self._owner[name]
        ck.prefetch(inner, index, merge)

    def whole_reads(self, name: str) -> bool:
        ck, inner = self._owner[name]
        return ck.whole_reads(inner)

    def layer(self, name: str) -> str:
        ck, inner = self._owner[name]
        return name.removesuffix(inner) + ck.layer(inner)

    def stored_name(self, name: str) -> str:
        ck, inner = self._owner[name]
        return name.removesuffix(inner) + ck.stored_name(inner)

    def check_heaps(self) -> None:
        for ck in self.members.values():
            ck.check_heaps()

    @property
    def provenance(self) -> dict | None:
        return next((p for ck in self.members.values() if (p := ck.provenance)), None)

    def settle(self, release: bool) -> None:
        for ck in self.members.values():
            ck.settle(release)

    def check_unchanged(self) -> None:
        for ck in self.members.values():
            ck.check_unchanged()

    def close(self) -> None:
        for ck in self.members.values():
            ck.close()

    @contextmanager
    def write_into(
        self, tmp: Path, fresh: Collection[str], *, optimizer: bool, provenance: dict
    ) -> Iterator[Write]:
        """The newest's folders and companions (training state only with `optimizer`),
        copied a piece at a time, then each weights file written by its adapter."""
        for p in sorted(self.path.rglob("*")):
            if p.is_dir() and not STATE.fullmatch(p.relative_to(self.path).as_posix() + "/"):
                (tmp / p.relative_to(self.path).as_posix()).mkdir(parents=True, exist_ok=True)
        for c in self._companions:
            if c.role != "state" or optimizer:
                _copy(c, tmp / c.name)
        fresh = set(fresh)
        with ExitStack() as stack:
            writers: dict[str, tuple[Write, str]] = {}
            places: dict[str, tuple[Path, int]] = {}
            for member, ck in self.members.items():
                mine = {inner: key for key, (owner, inner) in self._owner.items() if owner is ck}
                wanted = [inner for inner, key in mine.items() if key in fresh]
                w = stack.enter_context(
                    ck.write_into(tmp / member, wanted, optimizer=optimizer, provenance=provenance)
                )
                for inner in wanted:
                    writers[mine[inner]] = w, inner
                    if inner in w.targets.places:
                        places[mine[inner]] = w.targets.places[inner]

            def write(name: str, values: np.ndarray, index: tuple[slice, ...] = ()) -> None:
                w, inner = writers[name]
                w(inner, values, index)

            write.targets = Targets(places, None)  # each weights file, its own
            yield write


def _one_model(path: Path) -> None:
    """Refuse an `accelerate.save_state` folder of several models (model.safetensors,
    model_1.safetensors, ...): each is a checkpoint of its own."""
    models = sorted(p.name for p in path.glob("model*.safetensors"))
    if len(models) > 1:
        raise StreamavgError(
            f"{path}: holds {len(models)} models ({', '.join(models)}: accelerate.save_state); "
            f"average one model at a time, with --pattern '*/{models[0]}' on the folder above"
        )


def _copy(c: Companion, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for chunk in c.chunks():
            f.write(chunk)
