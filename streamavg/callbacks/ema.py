"""EMA: an exponential moving average of the weights, updated inside the compiled train step."""

from __future__ import annotations

import math
import weakref

import keras
from keras import ops

from .averager import Averager, count_arg

NOT_STARTED = 2**31 - 1  # the start step while waiting for `start_epoch` (fits int32, for JAX)
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {owner: hook}


class EMA(Averager):
    """Keeps an exponential moving average (EMA) of the model's weights during `fit`.

    Example:

    ```python
    ema = streamavg.callbacks.EMA(decay=0.999, state_path="run/ema.state.h5")
    model.fit(x, y, validation_data=(x_val, y_val), epochs=10, callbacks=[ema])
    # val_* metrics were measured on the average; the model now holds it
    ```

    After each optimizer step that changes the weights, the float32 shadow moves
    towards them: ``ema <- ema + (1 - d) * (w - ema)``, which is
    ``d * ema + (1 - d) * w``. The update is compiled into the train step (TensorFlow)
    or runs right after the optimizer (torch), on the weights' device, so no weights
    travel to the host. It starts from the weights at the start of the first `fit`.

    Args:
        decay: d, the share the average keeps at each update. Defaults to 0.999 unless
            a half-life is given instead.
        half_life_steps: the horizon as a half-life in optimizer steps: d = 0.5 ** (1 / h).
        half_life_epochs: the same in epochs, using `fit`'s steps per epoch (divided by
            the optimizer's `gradient_accumulation_steps`: updates per epoch).
        warmup: if True, d is capped at ``t / (9 + t)`` at the t-th optimizer step since
            the start, so early weights are soon forgotten (the schedule of
            `tf.train.ExponentialMovingAverage` with `num_updates`). False: the plain update.
        update_every: update every k optimizer steps with d ** k, keeping the horizon.
        start_step: before this many optimizer steps the average just follows the weights.
        start_epoch: the same, at the start of this epoch of `fit` (0-based, as `fit`
            counts them; in a custom loop, use `start_step`).
        validate: "average" (validation in `fit` sees the EMA), "raw", or "both"
            (val_* on the raw weights and val_<name>_* on the EMA).
        swap_on_epoch: let callbacks listed after this one see the EMA in `on_epoch_end`,
            so `ModelCheckpoint` saves it and `EarlyStopping(restore_best_weights=True)`
            keeps the best of it. Callbacks listed before it see the raw weights: put
            `BackupAndRestore` there.
        final_weights: "average" leaves the EMA in the model when `fit` ends, "raw" the
            trained weights. A later `fit` always trains on from the raw weights.
        non_trainable: "average" also averages float non-trainable variables (BatchNorm
            statistics); "copy" leaves them as trained. See `recalibrate_batchnorm`.
        save_freq: "epoch", or save every this many batches (as `fit` counts them: with
            `steps_per_execution`, each batch is that many steps).
        state_path: an HDF5 file of the shadow, step counts and configuration, written
            atomically at each save. The first `fit` of a new EMA that finds it resumes
            from it, exactly; the model must be at the same optimizer step (as
            `BackupAndRestore` ensures: give both the same save frequency). Averages are
            stored by the variables' order in the model, as Keras's weight files are, so a
            new process that generates other layer names resumes all the same; a model
            whose variables differ in number or shape is refused. After an exception,
            resume in a new EMA object; the old one continues from memory.
        delete_state: remove the state file when `fit` completes, as `BackupAndRestore`
            removes its backup; False keeps it.
        weights_path: also write the EMA as a `.weights.h5` that `model.load_weights`
            reads, at each save; it may use `{epoch}` and logs keys, like `ModelCheckpoint`.
        name: the prefix of the metrics that `validate="both"` adds.

    The variables to average are looked up again at the start of each `fit`: a layer
    unfrozen in between is averaged from then on, starting from its current value (its
    exact average if it was frozen until then), and the others keep their average.

    With `gradient_accumulation_steps=k` on the optimizer, the average folds after each
    real update (when `optimizer.iterations` advances, every k-th batch), and optimizer
    steps in these arguments are updates. In a custom training loop, call
    `ema.set_model(model)` once and `ema.update()` after each optimizer step;
    `with ema.swapped():` evaluates on the average.
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life_steps: float | None = None,
        half_life_epochs: float | None = None,
        warmup: bool = False,
        update_every: int = 1,
        start_step: int = 0,
        start_epoch: int | None = None,
        name: str = "ema",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        horizons = {"decay": decay, "half_life_steps": half_life_steps}
        horizons["half_life_epochs"] = half_life_epochs
        given = [k for k, v in horizons.items() if v is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"decay must be between 0 and 1 (exclusive); got {decay}")
        for key in ("half_life_steps", "half_life_epochs"):
            if horizons[key] is not None and not horizons[key] > 0:
                raise ValueError(f"{key} must be positive; got {horizons[key]}")
        self.update_every = count_arg("update_every", update_every, 1)
        self.start_step = count_arg("start_step", start_step, 0)
        if start_epoch is not None:
            count_arg("start_epoch", start_epoch, 0)
            if start_step:
                raise ValueError("give start_step or start_epoch, not both")
        self.warmup = bool(warmup)
        self.start_epoch = start_epoch
        self.half_life_epochs = half_life_epochs
        if half_life_steps is not None:
            self._log_decay = math.log(0.5) / half_life_steps
        elif half_life_epochs is None:
            self._log_decay = math.log(0.999 if decay is None else decay)
        else:
            self._log_decay = None  # known once fit says how many steps an epoch has

    @property
    def decay(self) -> float | None:
        """The per-step decay d (None until `fit` resolves a half-life in epochs)."""
        return None if self._log_decay is None else math.exp(self._log_decay)

    def update(self) -> None:
        """Fold in the model's current weights after one optimizer step."""
        if self._log_decay is None:
            raise ValueError(
                "half_life_epochs needs fit's steps per epoch; outside fit, give half_life_steps"
            )
        if self._tracked is None:
            self._build()
        self._steps.assign_add(1)
        t = self._steps - self._begin  # steps since the start: the first update has t = 1
        if self.update_every == 1 and not self._waits():
            self._fold(self._share(t))
        else:
            due = ops.logical_or(ops.less_equal(t, 0), ops.equal(t % self.update_every, 0))
            ops.cond(due, lambda: self._fold(self._share(t)), lambda: None)

    def _waits(self) -> bool:
        return self.start_step > 0 or self.start_epoch is not None

    def _share(self, t):
        """1 - d ** k for the t-th step since the start; 1 (follow the weights) before it."""
        k = self.update_every
        if not self.warmup:
            share = -math.expm1(k * self._log_decay)
        else:
            capped = 9 / (9 + ops.cast(ops.maximum(t, 1), "float32"))  # 1 - t / (9 + t)
            one = ops.maximum(-math.expm1(self._log_decay), capped)
            share = one if k == 1 else -ops.expm1(k * ops.log1p(-one))
        if self._waits():
            share = ops.where(ops.less_equal(t, 0), 1.0, share)
        return share

    def set_model(self, model):
        super().set_model(model)
        if self._tracked is None and model.built:
            self._build()

    def _build(self) -> None:
        super()._build()
        self._steps = keras.Variable(0, dtype="int64", trainable=False, name=f"{self.name}_steps")
        self._begin = keras.Variable(
            self._first_step(), dtype="int64", trainable=False, name=f"{self.name}_begin"
        )

    def _first_step(self) -> int:
        return self.start_step if self.start_epoch is None else NOT_STARTED

    def _start(self) -> None:
        self._fold(1.0)
        self._steps.assign(0)
        self._begin.assign(self._first_step())

    def _config(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "update_every": self.update_every,
            "start_step": self.start_step,
            "start_epoch": self.start_epoch,
        }

    def _counters(self) -> dict[str, int]:
        return {"steps": _int(self._steps), "begin": _int(self._begin)}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self._steps.assign(counters["steps"])
        self._begin.assign(counters["begin"])

    def on_train_begin(self, logs=None):
        if keras.backend.backend() == "jax":
            raise RuntimeError(
                "EMA updates inside the train step on the tensorflow and torch backends; "
                "on jax, call update() from a custom training loop"
            )
        if self.half_life_epochs is not None:
            steps = self.params.get("steps")
            if not steps:
                raise ValueError("half_life_epochs needs a known number of steps per epoch")
            every = _innermost(self.model.optimizer).gradient_accumulation_steps or 1
            updates = steps / every  # per epoch, on average
            self._log_decay = math.log(0.5) / (self.half_life_epochs * updates)
        super().on_train_begin(logs)
        _hook(self.model.optimizer, self, self._after_step)
        self.model.make_train_function(force=True)  # traced anew, with the update inside

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        started = self.start_epoch is None or _int(self._begin) != NOT_STARTED
        if not started and epoch >= self.start_epoch:
            self._begin.assign(self._steps)

    def _detach(self) -> None:
        super()._detach()
        _unhook(self.model.optimizer, self)
        self.model.make_train_function(force=True)  # untraced: the next fit traces it bare

    def _after_step(self, applied) -> None:
        if applied is True:
            self.update()
        else:
            ops.cond(applied, self.update, lambda: None)


def _int(variable) -> int:
    return int(ops.convert_to_numpy(variable))


def _innermost(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


def _hook(optimizer, owner, hook) -> None:
    """Call `hook(applied)` after each `apply` of `optimizer`, inside the train step.

    `applied` says whether the weights were updated. Without gradient accumulation every
    `apply` updates: True. With it, whether `apply` advanced `optimizer.iterations`, which
    counts updates, not micro-steps (a tensor, known on the device only): comparing the
    counts holds however the optimizer schedules its updates internally. The innermost
    optimizer is hooked: `LossScaleOptimizer` skips it on non-finite gradients, so
    skipped steps never reach the hook.
    """
    opt = _innermost(optimizer)
    hooks = _HOOKS.get(opt)
    if hooks is None:
        hooks = _HOOKS[opt] = {}
        apply = opt.apply

        def apply_then_hooks(grads, trainable_variables=None):
            accumulates = bool(opt.gradient_accumulation_steps)
            # A copy: the variable itself may read back after apply's in-place increment.
            before = ops.copy(opt.iterations) if accumulates else None
            apply(grads, trainable_variables)
            applied = ops.greater(opt.iterations, before) if accumulates else True
            for h in list(hooks.values()):
                h(applied)

        opt.apply = apply_then_hooks
    for stale in [o for o in hooks if o._fit is not owner._fit]:  # left by an interrupted fit
        del hooks[stale]
    hooks[owner] = hook


def _unhook(optimizer, owner) -> None:
    opt = _innermost(optimizer)
    hooks = _HOOKS.get(opt, {})
    hooks.pop(owner, None)
    if not hooks and opt in _HOOKS:
        del _HOOKS[opt]
        del opt.apply
