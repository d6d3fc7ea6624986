"""PostHocEMA: snapshots of power-function EMAs during `fit`, from which `streamavg phema`
makes an EMA of any length after training (Karras et al., EDM2, 2024)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
from keras import ops

from ..posthoc import SNAPSHOT_ATTR, check_sigma_rel, gamma
from ..publish import atomic_output
from . import _keras_compat as compat
from .averager import count_arg
from .ema import EMA, _innermost


class PostHocEMA(keras.callbacks.Callback):
    """Keeps power-function EMAs of the weights and saves snapshots of them every
    `every_steps` optimizer steps, for choosing the EMA length after training.

    Example:

    ```python
    phema = streamavg.callbacks.PostHocEMA("run/phema", sigma_rels=(0.05, 0.10), every_steps=500)
    model.fit(x, y, epochs=100, callbacks=[phema])
    # then: streamavg phema run/phema --sigma-rel 0.07 -o ema-0.07.weights.h5
    ```

    Each EMA, one per `sigma_rel`, moves after the t-th optimizer step (real updates
    only, counted from 1 at the start of the first `fit`) with the decay
    ``(1 - 1/t) ** (gamma + 1)``, where gamma gives the EMA the relative width
    `sigma_rel`: it averages the weights of steps 1..t with weights growing as
    ``step ** gamma``. The updates run in the train step, as `EMA`'s do, on every backend.

    Every `every_steps` steps each EMA is written to `directory` as a float32
    `phema-<sigma_rel>-<step>.weights.h5` holding the model's weights (no optimizer
    state) that `model.load_weights` reads, with its sigma_rel, gamma and step in the
    file's `streamavg_phema` attribute; writes are atomic. With steps_per_execution
    or skipped steps, a snapshot may come a few steps late; the step it records is exact.
    The EMAs' state goes to `phema-<sigma_rel>.state.h5` there at every epoch's end, so
    that a new `PostHocEMA` on the same directory resumes exactly, as `EMA` does (with
    `BackupAndRestore` before it); the files stay after `fit`, so that training can go on
    later. `save_model` also writes the compiled model once, as `model.keras`, which
    `streamavg phema --sweep` uses to evaluate.

    Args:
        directory: where the snapshots and state go.
        sigma_rels: the EMAs' relative widths, each in (0, 0.2887).
        every_steps: the snapshot period, in optimizer steps.
        non_trainable: "average" (BatchNorm statistics too) or "copy", as for `EMA`.
        save_model: write `directory/model.keras` at the start of the first `fit`.
    """

    def __init__(
        self,
        directory: str | Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_steps: int = 1000,
        *,
        non_trainable: str = "average",
        save_model: bool = True,
    ):
        compat.require_supported_keras()
        super().__init__()
        sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must be distinct, and at least one; got {sigma_rels}")
        self.directory = Path(directory)
        self.every_steps = count_arg("every_steps", every_steps, 1)
        self.save_model = bool(save_model)
        self.emas = [
            _PowerEMA(
                s,
                validate="raw",
                swap_on_epoch=False,
                final_weights="raw",
                non_trainable=non_trainable,
                state_path=self.directory / f"phema-{s:g}.state.h5",
                delete_state=False,
                name=f"phema_{i}",
            )
            for i, s in enumerate(sigma_rels)
        ]
        self._steps = 0  # optimizer steps when the epoch began (exact)
        self._next: int | None = None  # the step of the next snapshot

    def set_model(self, model):
        super().set_model(model)
        for ema in self.emas:
            ema.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for ema in self.emas:
            ema.set_params(params)

    def on_train_begin(self, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.save_model and not (self.directory / "model.keras").exists():
            self._write_model()
        for ema in self.emas:
            ema.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        for ema in self.emas:
            ema.on_epoch_begin(epoch, logs)  # the first loads a state file, if there is one
        self._steps = self.emas[0]._step_count()
        if self._next is None:  # a new run, or resumed: a snapshot due now is taken now
            self._next = max(
                self.every_steps, -(-self._steps // self.every_steps) * self.every_steps
            )
        if self._steps >= self._next:
            self._snapshot(self._steps)

    def on_train_batch_end(self, batch, logs=None):
        every = _innermost(self.model.optimizer).gradient_accumulation_steps or 1
        due = self._next  # set by on_epoch_begin
        if due is None or self._steps + -(-(batch + 1) // every) < due:  # at most the steps taken
            return
        step = self.emas[0]._step_count()  # exact: skipped steps do not count
        if step >= due:
            self._snapshot(step)

    def on_epoch_end(self, epoch, logs=None):
        for ema in self.emas:
            ema.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        for ema in self.emas:
            ema.on_train_end(logs)

    def _snapshot(self, step: int) -> None:
        for ema in self.emas:
            meta = {"sigma_rel": ema.sigma_rel, "gamma": ema.gamma, "step": step}
            path = self.directory / f"phema-{ema.sigma_rel:g}-{step:09d}.weights.h5"
            ema._save_model_weights(path, {SNAPSHOT_ATTR: json.dumps(meta)})
        self._next = (step // self.every_steps + 1) * self.every_steps

    def _write_model(self) -> None:
        try:
            with atomic_output(
                self.directory / "model.keras", overwrite=True, suffix=".keras"
            ) as tmp:
                self.model.save(tmp)
        except Exception as e:  # a model Keras cannot save must not stop training
            warnings.warn(f"PostHocEMA: model.keras not written ({e})", stacklevel=2)


class _PowerEMA(EMA):
    """The power-function EMA of relative width `sigma_rel`: after its t-th step, the
    decay is (1 - 1/t) ** (gamma + 1)."""

    def __init__(self, sigma_rel: float, **kwargs):
        super().__init__(**kwargs)
        self.sigma_rel = sigma_rel
        self.gamma = gamma(sigma_rel)

    def _constant_share(self) -> None:
        return None

    def _share(self, t):
        t = ops.cast(ops.maximum(t, 1), "float32")
        return -ops.expm1((self.gamma + 1) * ops.log1p(-1 / t))  # 1 - decay; 1 at t = 1

    def _config(self) -> dict:
        return {**super()._config(), "sigma_rel": self.sigma_rel}
