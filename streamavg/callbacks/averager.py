"""What EMA and WindowAverage share: one shadow copy of the weights, folded, shown and saved.

Both keep a running weighted average in a single shadow copy: each fold moves it by a
`share` towards the model's current weights, ``shadow <- shadow + share * (w - shadow)``,
which is ``(1 - share) * shadow + share * w``. They differ only in when they fold and by
how much: EMA after every optimizer step with ``share = 1 - decay``, WindowAverage once
per epoch with the newest epoch's weight under the offline scheme.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeGuard

import h5py
import keras
import numpy as np
from keras import ops

from .._version import __version__
from ..publish import atomic_output
from . import _keras_compat as compat

VALIDATE = ("average", "raw", "both")
FINAL_WEIGHTS = ("average", "raw")
NON_TRAINABLE = ("average", "copy")
STATE_ATTR = "streamavg_state"
SHADOW_GROUP = "shadow"  # in a state file: the shadows by position, "0", "1", ...


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def count_arg(name: str, value, minimum: int) -> int:
    """`value` if it is an int (not a bool) of at least `minimum`; else a clear ValueError."""
    if not _is_count(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class Averager(keras.callbacks.Callback):
    """Base class: the shadow weights and everything done with them around `fit`.

    Subclasses decide when to call `_fold` and by what share, and name their counters.
    """

    def __init__(
        self,
        *,
        validate: str = "average",
        swap_on_epoch: bool = True,
        final_weights: str = "average",
        non_trainable: str = "average",
        save_freq: str | int = "epoch",
        state_path: str | Path | None = None,
        weights_path: str | Path | None = None,
        delete_state: bool = True,
        name: str = "ema",
    ):
        compat.require_supported_keras()
        super().__init__()
        self.validate = _choice("validate", validate, VALIDATE)
        self.swap_on_epoch = bool(swap_on_epoch)
        self.final_weights = _choice("final_weights", final_weights, FINAL_WEIGHTS)
        self.non_trainable = _choice("non_trainable", non_trainable, NON_TRAINABLE)
        if save_freq != "epoch" and not (_is_count(save_freq) and save_freq > 0):
            raise ValueError(f"save_freq must be 'epoch' or a positive int; got {save_freq!r}")
        self.save_freq = save_freq
        self.state_path = Path(state_path) if state_path is not None else None
        if weights_path is not None and not str(weights_path).endswith(".weights.h5"):
            raise ValueError(f"weights_path must end in .weights.h5; got {str(weights_path)!r}")
        self.weights_path = weights_path
        self.delete_state = bool(delete_state)
        if not name.isidentifier():
            raise ValueError(f"name must be an identifier, used in metric names; got {name!r}")
        self.name = name
        self._tracked: list = []  # the model variables averaged
        self._tracking = False  # whether the variables were chosen: the shadow holds an average
        self._shadow: list = []
        self._raw: list | None = None  # the raw weights, while the model shows the average
        self._started = False
        self._fit = None  # the History of the fit this callback last joined: identifies it
        self._epoch = 0
        self._batches = 0  # since the last save, when saving every `save_freq` batches
        if isinstance(save_freq, int) and (state_path or weights_path):
            # Bound here only: a class-level batch hook would stop Keras dispatching every
            # callback's batch hooks asynchronously, and slow down all other fits.
            self.on_train_batch_end = self._save_every

    # -- the shadow ------------------------------------------------------------------

    def _build(self) -> None:
        """Start averaging: shadows of the model's current weights (subclasses add counters)."""
        self._track()

    def _track(self) -> None:
        """Average the variables the model has now: the trainable ones, and the float
        non-trainable ones (BatchNorm statistics) under ``non_trainable="average"``.

        Run again at the start of each later `fit`, so that a layer unfrozen in between is
        averaged from then on. A variable averaged before keeps its shadow, matched by
        identity (unfreezing moves variables within the lists); a new one starts from its
        current value, which is its exact average if it was frozen until now; variables no
        longer tracked stop being averaged.
        """
        self._sync()
        model = self.model
        tracked = list(model.trainable_variables)
        if self.non_trainable == "average":
            tracked += [v for v in model.non_trainable_variables if _is_float(v.dtype)]
        kept = {id(v): s for v, s in zip(self._tracked, self._shadow, strict=True)}
        self._shadow = [kept[id(v)] if id(v) in kept else self._new_shadow(v) for v in tracked]
        self._tracked, self._tracking = tracked, True

    def _new_shadow(self, v) -> keras.Variable:
        """A shadow of `v` (float32 at least) holding its current value, laid out as `v`
        under a `keras.distribution` (sharded like it, never gathered on one device)."""
        dtype = _shadow_dtype(v.dtype)
        layout = compat.layout_of(v)  # Keras's own, given where a LayoutMap names `v`
        return self._variable(_copy(v, dtype), dtype, f"{self.name}_{v.name}", layout)

    def _variable(self, value, dtype: str, name: str, layout=None) -> keras.Variable:
        """A variable of the average's state, made where the model's weights are: under
        the model's `tf.distribute` strategy, mirrored on each of its replicas."""
        scope = nullcontext()
        if keras.backend.backend() == "tensorflow":
            scope = self.model.distribute_strategy.scope()
        with scope:
            return keras.Variable(value, dtype=dtype, trainable=False, name=name, layout=layout)

    def _fold(self, share: float) -> None:
        """Move the shadow by `share` towards the model's weights, on the weights' device."""
        self._sync()
        for s, v in zip(self._shadow, self._tracked, strict=True):
            if share == 1.0:  # exact, where a fold may be 1 ulp off
                s.assign(_copy(v, s.dtype))
            else:
                s.assign(moved(s, v, share))

    def _sync(self) -> None:
        """Bring the shadow variables up to date where the average is kept elsewhere during
        `fit` (JAX's compiled train step): before any use of them outside the train step."""

    def averaged_weights(self) -> dict[str, np.ndarray]:
        """The shadow, by variable path, in float32 (float64 for float64 variables)."""
        self._sync()
        pairs = zip(self._shadow, self._tracked, strict=True)
        return {v.path: ops.convert_to_numpy(s) for s, v in pairs}

    def _ready(self) -> bool:
        """Whether the shadow holds an average yet."""
        return self._tracking

    # -- showing the average in the model --------------------------------------------

    def _show_average(self) -> None:
        if self._raw is not None or not self._ready():
            return
        self._sync()
        self._attach()
        self._raw = [ops.copy(v.value) for v in self._tracked]
        for s, v in zip(self._shadow, self._tracked, strict=True):
            v.assign(_copy(s, v.dtype))

    def restore_raw(self) -> None:
        """Put the raw weights back if the model shows the average (say, after an exception
        in a later callback's `on_epoch_end`, or to train on after `fit` by hand)."""
        self._show_raw()

    def _show_raw(self) -> None:
        if self._raw is None:
            return
        self._attach()
        for r, v in zip(self._raw, self._tracked, strict=True):
            v.assign(r)
        self._raw = None

    def _attach(self) -> None:
        """On JAX, put the weights that `fit` or `evaluate` holds between steps back in the
        model's variables before reading or assigning them, so that none of it is later
        written over what is assigned here."""
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()

    def _holds_average(self) -> bool:
        self._sync()
        return all(
            bool(ops.all(ops.equal(v, ops.cast(s, v.dtype))))
            for s, v in zip(self._shadow, self._tracked, strict=True)
        )

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Show the averaged weights in the model for the block, then restore the raw ones.

        The raw weights are copied aside and written back, so they return bit-exact, even
        when the block raises.

        >>> with ema.swapped():  # doctest: +SKIP
        ...     model.evaluate(x_val, y_val)
        """
        shown_before = self._raw is not None
        self._show_average()
        try:
            yield
        finally:
            if not shown_before:
                self._show_raw()

    # -- saving ----------------------------------------------------------------------

    def save_weights(self, path: str | Path) -> None:
        """Write the averaged weights atomically as a `.weights.h5` that `load_weights` reads."""
        path = Path(path)
        with self.swapped(), atomic_output(path, overwrite=True, suffix=".weights.h5") as tmp:
            self.model.save_weights(tmp, overwrite=True)

    def _save_model_weights(self, path: Path, attrs: dict[str, str]) -> None:
        """`save_weights` without the optimizer's state (the model's weights only), with
        `attrs` on the file's root."""
        with (
            self.swapped(),
            tempfile.TemporaryDirectory(prefix="streamavg-") as scratch,
            atomic_output(path, overwrite=True, suffix=".weights.h5") as tmp,
        ):
            whole = Path(scratch) / "whole.weights.h5"
            self.model.save_weights(whole)
            with h5py.File(whole, "r") as src, h5py.File(tmp, "w") as dst:
                for key in src:
                    if key != "optimizer":
                        src.copy(src[key], dst, key)
                dst.attrs.update({**src.attrs, **attrs})

    def save_state(self, path: str | Path) -> None:
        """Write the shadow, the counters and the configuration atomically, for `load_state`.

        The shadows are stored by the position of their variable in the tracked list
        (datasets ``shadow/0``, ``shadow/1``, ...; each variable's path is kept as an
        attribute, for information only), as Keras's own weight files do: a new process may
        generate other layer names for the same model.
        """
        self._sync()
        state = {
            "streamavg": __version__,
            "kind": type(self).__name__,
            "config": self._config(),
            "counters": self._counters(),
            "optimizer_step": self._optimizer_step(),
        }
        with atomic_output(Path(path), overwrite=True) as tmp, h5py.File(tmp, "w") as f:
            f.attrs[STATE_ATTR] = json.dumps(state)
            group = f.create_group(SHADOW_GROUP)
            for i, (s, v) in enumerate(zip(self._shadow, self._tracked, strict=True)):
                group.create_dataset(str(i), data=ops.convert_to_numpy(s)).attrs["path"] = v.path

    def load_state(self, path: str | Path) -> None:
        """Resume from `save_state`'s file; the model must be at the optimizer step it was saved at.

        The shadows are matched to the model's variables by position and shape, not by name.
        Raises ValueError, naming the file, if it was written for another configuration,
        model or point of training.
        """
        if not self._tracking:
            self._build()
        self._sync()
        with h5py.File(path, "r") as f:
            state = json.loads(f.attrs[STATE_ATTR])
            mine = {"kind": type(self).__name__, "config": self._config()}
            saved = {"kind": state["kind"], "config": state["config"]}
            if saved != mine:
                raise ValueError(f"{path}: saved by {saved}, but this callback is {mine}")
            step = self._optimizer_step()
            if state["optimizer_step"] != step:
                raise ValueError(
                    f"{path}: saved at optimizer step {state['optimizer_step']}, but the model "
                    f"is at step {step}; restore the matching weights first (for example with "
                    "keras.callbacks.BackupAndRestore) or remove the file to start afresh"
                )
            group = f.get(SHADOW_GROUP)
            if group is None:  # before 0.2, shadows were stored by variable path
                raise ValueError(
                    f"{path}: written by streamavg {state['streamavg']}, whose state files "
                    "this version does not read; remove it to start afresh"
                )
            if len(group) != len(self._shadow):
                raise ValueError(
                    f"{path}: holds {len(group)} averaged variables, but this model has "
                    f"{len(self._shadow)}"
                )
            datasets = [group[str(i)] for i in range(len(group))]
            for i, (data, v) in enumerate(zip(datasets, self._tracked, strict=True)):
                if data.shape != tuple(v.shape):
                    raise ValueError(
                        f"{path}: averaged variable {i} ({v.path}) has shape {tuple(v.shape)}, "
                        f"but the file's variable {i} ({data.attrs['path']}) has shape "
                        f"{data.shape}"
                    )
            values = [data[()] for data in datasets]
        for s, value in zip(self._shadow, values, strict=True):
            s.assign(value)
        self._set_counters(state["counters"])

    def _optimizer_step(self) -> int | None:
        optimizer = getattr(self.model, "optimizer", None)
        return None if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))

    def _save(self, epoch: int, logs: dict | None) -> None:
        self._attach()
        if self.state_path is not None:
            self.save_state(self.state_path)
        if self.weights_path is not None and self._ready():
            self.save_weights(str(self.weights_path).format(epoch=epoch + 1, **(logs or {})))

    def _save_every(self, batch: int, logs: dict | None = None) -> None:
        self._batches += 1
        if self._batches >= int(self.save_freq):  # an int: only then is this the hook
            self._batches = 0
            self._save(self._epoch, logs)

    # -- the fit lifecycle -----------------------------------------------------------

    def on_train_begin(self, logs=None):
        patched = vars(self.model).get("evaluate")
        owner = getattr(patched, "__self__", None)
        rival = owner not in (None, self) and owner._fit is self.model.history
        if self.validate != "raw" and rival:
            raise ValueError(
                "only one averaging callback per fit can validate; "
                "pass validate='raw' to the others"
            )
        self._fit = self.model.history  # fit gives every run a new History
        if not self._tracking:
            self._build()
        else:  # a later fit: train on from the raw weights, averaging what is trained now
            if self._raw is not None:  # the average was left in the model by the last fit
                if self._holds_average():
                    self._show_raw()
                else:
                    self._raw = None  # someone replaced the weights since: train from theirs
            self._track()
        if self.validate != "raw":
            self.model.evaluate = self._evaluate  # replaces one left by an interrupted fit

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._show_raw()
        if not self._started:  # only now has BackupAndRestore restored the model
            if self.state_path is not None and self.state_path.exists():
                self.load_state(self.state_path)
            else:
                self._start()
            self._started = True

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch, logs)
        if self.swap_on_epoch:
            self._show_average()

    def on_train_end(self, logs=None):
        self._detach()
        if isinstance(self.save_freq, int):
            self._save(self._epoch, logs)
        if self.delete_state and self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        if self.final_weights == "average":
            self._show_average()
            if self._raw is not None:  # kept for the next fit: on the host, not the device
                self._raw = [ops.convert_to_numpy(r) for r in self._raw]
        else:
            self._show_raw()

    def _evaluate(self, *args, **kwargs):
        """`model.evaluate` for fit's validation: on the average, or on both (`<name>_*`)."""
        evaluate = type(self.model).evaluate
        if not compat.is_fit_validation(kwargs):  # leave other calls be
            return evaluate(self.model, *args, **kwargs)
        try:
            self._before_validation()
            if self.validate == "both":
                raw = evaluate(self.model, *args, **kwargs)
                with self.swapped():
                    average = evaluate(self.model, *args, **kwargs)
                return {**raw, **{f"{self.name}_{k}": v for k, v in average.items()}}
            with self.swapped():
                return evaluate(self.model, *args, **kwargs)
        except BaseException:
            self._detach()  # fit is being abandoned: leave the model as we found it
            raise

    def _detach(self) -> None:
        """Undo what on_train_begin did to the model."""
        if vars(self.model).get("evaluate") == self._evaluate:
            del self.model.evaluate

    # -- for subclasses --------------------------------------------------------------

    def _start(self) -> None:
        """Begin averaging at the start of the first fit (no state file to resume from)."""

    def _before_validation(self) -> None:
        """Bring the average up to date before fit validates."""

    def _config(self) -> dict:
        raise NotImplementedError

    def _counters(self) -> dict[str, int]:
        raise NotImplementedError

    def _set_counters(self, counters: dict[str, int]) -> None:
        raise NotImplementedError


def moved(shadow, weight, share):
    """`shadow` moved by `share` towards `weight`: ``shadow + share * (weight - shadow)``,
    in the shadow's dtype."""
    if not isinstance(share, float):
        share = ops.cast(share, shadow.dtype)
    return shadow + share * (ops.cast(weight, shadow.dtype) - shadow)


def _copy(x, dtype):
    """`x` in `dtype`, never sharing its buffer: JAX's train step donates the model's."""
    return ops.copy(ops.cast(x, dtype))


def _is_float(dtype) -> bool:
    return "float" in str(dtype)


def _shadow_dtype(dtype) -> str:
    return "float64" if str(dtype) == "float64" else "float32"
