"""EMA: an exponential moving average of the weights, updated inside the compiled train step."""

from __future__ import annotations

import math

import keras
from keras import ops

from . import _keras_compat as compat
from .averager import Averager, count_arg, moved

_TORCH = keras.backend.backend() == "torch"  # the update runs eagerly after `apply`
NOT_STARTED = 2**31 - 1  # the start step while waiting for `start_epoch` (fits int32, for JAX)
_STEPS = "_streamavg_ema_steps"  # where a model keeps its `_Steps`


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
    ``d * ema + (1 - d) * w``. The update is compiled into the train step (TensorFlow,
    JAX) or runs right after the optimizer (torch), on the weights' device, so no weights
    travel to the host; under a `keras.distribution` each average is laid out like its
    weight, and under a `tf.distribute` strategy it is mirrored like it, each replica
    updating its own copy. It starts from the weights at the start of the first `fit`.

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
            if (value := horizons[key]) is not None and not value > 0:
                raise ValueError(f"{key} must be positive; got {value}")
        self.update_every = count_arg("update_every", update_every, 1)
        self.start_step = count_arg("start_step", start_step, 0)
        if start_epoch is not None:
            count_arg("start_epoch", start_epoch, 0)
            if start_step:
                raise ValueError("give start_step or start_epoch, not both")
        self.warmup = bool(warmup)
        self.start_epoch = start_epoch
        self.half_life_epochs = half_life_epochs
        self._log_decay: float | None  # log d; None until fit resolves half_life_epochs
        if half_life_steps is not None:
            self._log_decay = math.log(0.5) / half_life_steps
        elif half_life_epochs is None:
            self._log_decay = math.log(0.999 if decay is None else decay)
        else:
            self._log_decay = None  # known once fit says how many steps an epoch has
        self._device: tuple | None = None  # on JAX during fit: the state the train step holds

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
        if not self._tracking:
            self._build()
        self._sync()
        self._step(True)

    def _step(self, applied) -> None:
        """Assign `_next`'s state to the shadow and the step count."""
        share = self._constant_share()
        if applied is True and self._each_step() and share is not None and _TORCH:
            self._steps.assign_add(1)
            _lerp(self._shadow, self._tracked, share)
            return
        shadows, steps = self._next(self._shadow, self._tracked, self._steps, self._begin, applied)
        self._steps.assign(steps)
        for s, new in zip(self._shadow, shadows, strict=True):
            s.assign(new)  # in a tf.distribute replica: that replica's copy

    def _next(self, shadows, weights, steps, begin, applied):
        """The shadows and step count after one optimizer step, as a pure function of the
        shadows, the weights after the step, and the step counts: what every backend runs.

        `applied` says whether the step updated the weights: True, or a boolean tensor
        (gradient accumulation: only real updates count).
        """
        steps = steps + (1 if applied is True else ops.cast(applied, steps.dtype))
        t = steps - begin  # steps since the start: the first update has t = 1
        share = self._share(t)
        if applied is True and self._each_step():
            return [moved(s, w, share) for s, w in zip(shadows, weights, strict=True)], steps
        due = ops.logical_or(ops.less_equal(t, 0), ops.equal(t % self.update_every, 0))
        if applied is not True:
            due = ops.logical_and(applied, due)
        new = ops.cond(
            due,
            lambda: [moved(s, w, share) for s, w in zip(shadows, weights, strict=True)],
            lambda: [ops.convert_to_tensor(s) for s in shadows],
        )
        return new, steps

    def _each_step(self) -> bool:
        """Whether every optimizer step updates the average (no `update_every`, no start)."""
        return self.update_every == 1 and not self._waits()

    def _waits(self) -> bool:
        return self.start_step > 0 or self.start_epoch is not None

    def _constant_share(self) -> float | None:
        """The share of every update, where it does not change with the step (no warm-up)."""
        return None if self.warmup else -math.expm1(self.update_every * self._log_d())

    def _log_d(self) -> float:
        """log d, which `on_train_begin` resolves from a half-life in epochs."""
        if self._log_decay is None:
            raise RuntimeError("the decay of half_life_epochs is known once fit begins")
        return self._log_decay

    def _share(self, t):
        """1 - d ** k for the t-th step since the start; 1 (follow the weights) before it."""
        k = self.update_every
        share = self._constant_share()
        if share is None:
            capped = 9 / (9 + ops.cast(ops.maximum(t, 1), "float32"))  # 1 - t / (9 + t)
            one = ops.maximum(-math.expm1(self._log_d()), capped)
            share = one if k == 1 else -ops.expm1(k * ops.log1p(-one))
        if self._waits():
            share = ops.where(ops.less_equal(t, 0), 1.0, share)
        return share

    def set_model(self, model):
        super().set_model(model)
        if not self._tracking and model.built:
            self._build()

    def _build(self) -> None:
        super()._build()
        self._steps = self._variable(0, "int64", f"{self.name}_steps")
        self._begin = self._variable(self._first_step(), "int64", f"{self.name}_begin")

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
        if self.half_life_epochs is not None:
            steps = self.params.get("steps")
            if not steps:
                raise ValueError("half_life_epochs needs a known number of steps per epoch")
            every = _innermost(self.model.optimizer).gradient_accumulation_steps or 1
            updates = steps / every  # per epoch, on average
            self._log_decay = math.log(0.5) / (self.half_life_epochs * updates)
        super().on_train_begin(logs)
        _join(self.model, self)

    def on_epoch_begin(self, epoch, logs=None):
        self._sync()
        super().on_epoch_begin(epoch, logs)
        started = self.start_epoch is None or _int(self._begin) != NOT_STARTED
        if not started and epoch >= self.start_epoch:
            self._begin.assign(self._steps)

    def _detach(self) -> None:
        super()._detach()
        self._sync()
        _leave(self.model, self)

    # -- on JAX, the average travels through the compiled train step -----------------

    def _sync(self) -> None:
        if self._device is None:
            return
        shadows, steps, _ = self._device
        self._device = None  # the variables own these arrays now: no train step donates them
        for s, value in zip(self._shadow, shadows, strict=True):
            s.assign(value)
        self._steps.assign(steps)

    def _step_count(self) -> int:
        """The optimizer steps folded in so far (read from the device on JAX during fit)."""
        return int(ops.convert_to_numpy(self._device[1] if self._device else self._steps))

    def _on_device(self) -> tuple:
        """The state that JAX's train step takes and returns (and donates): the shadows, the
        step count and the start step, copied from the variables at the first step."""
        if self._device is None:
            shadows = [ops.copy(s.value) for s in self._shadow]
            self._device = shadows, ops.copy(self._steps.value), ops.copy(self._begin.value)
        return self._device

    def _trace_key(self) -> tuple:
        """What a traced train step bakes in of this EMA: another key, another trace."""
        return self._log_decay, tuple(map(id, self._tracked)), tuple(map(id, self._shadow))


def _lerp(shadows, weights, share: float) -> None:
    """torch: `moved` in place, in one fused kernel over all the shadows. The update is
    memory-bound, and this reads each weight and shadow once and writes the shadow once
    (as Keras's torch optimizers update their variables)."""
    values = [s.value for s in shadows]
    ends = [w.value.to(s.dtype) for s, w in zip(values, weights, strict=True)]
    compat.lerp_(values, ends, share)


def _int(variable) -> int:
    return int(ops.convert_to_numpy(variable))


def _innermost(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


class _Steps:
    """The EMAs a model's train step updates, with the train function it had without them
    (`bare`) and the last one traced with them, by `key`: later fits with the same EMAs,
    variables and decay reuse it instead of tracing again."""

    def __init__(self, bare) -> None:
        self.bare = bare
        self.owners: dict[EMA, None] = {}  # in the order they joined
        self.key: list | None = None
        self.function = None


def _join(model, owner: EMA) -> None:
    """Put `owner`'s update into `model`'s train step, for this fit."""
    steps = vars(model).get(_STEPS)
    if steps is None or model.train_function not in (steps.bare, steps.function):
        steps = _Steps(model.train_function)  # new, or compiled again since: a new function
        vars(model)[_STEPS] = steps
    for stale in [o for o in steps.owners if o._fit is not owner._fit]:  # an interrupted fit's
        del steps.owners[stale]
    steps.owners[owner] = None
    _install(model, steps)


def _leave(model, owner: EMA) -> None:
    steps = vars(model).get(_STEPS)
    if steps is not None and owner in steps.owners:
        del steps.owners[owner]
        _install(model, steps)


def _install(model, steps: _Steps) -> None:
    """Give `model` the train function that updates every EMA of `steps`: the bare one
    for none, else the last one traced if it was traced for the same key."""
    owners = list(steps.owners)
    opt = _innermost(model.optimizer)
    if keras.backend.backend() != "jax":  # the update runs inside `apply`, hooked while needed
        compat.unhook_apply(opt)  # ours, maybe for another `_Steps` (compiled again since)
        if owners:
            _hook(opt, steps)
    if not owners:
        model.train_function = steps.bare
        return
    key = [(o, o._trace_key()) for o in owners]
    if key != steps.key:
        steps.key = key
        if keras.backend.backend() == "jax":
            steps.function = _jax_train_function(model, owners)
        else:
            model.make_train_function(force=True)  # traced at its first call, with the hook
            steps.function = model.train_function
    model.train_function = steps.function


def _hook(opt, steps: _Steps) -> None:
    """Run every EMA's update after each `apply` of the (innermost) optimizer `opt`, inside
    the train step (TensorFlow, torch).

    Whether `apply` updated the weights: without gradient accumulation, always; with it,
    whether `apply` advanced `opt.iterations`, which counts updates, not micro-steps (a
    tensor, known on the device only). The innermost optimizer is hooked:
    `LossScaleOptimizer` skips it on non-finite gradients, so skipped steps never count.
    """

    def apply_then_update(apply, grads, trainable_variables=None):
        accumulates = bool(opt.gradient_accumulation_steps)
        # A copy: the variable itself may read back after apply's in-place increment.
        before = ops.copy(opt.iterations) if accumulates else None
        apply(grads, trainable_variables)
        applied = ops.greater(opt.iterations, before) if accumulates else True
        for owner in steps.owners:
            owner._step(applied)

    compat.hook_apply(opt, apply_then_update)


def _jax_train_function(model, owners: list[EMA]):
    """`model`'s train function on JAX, with every EMA's update compiled into its step.

    JAX's train step is a pure function of the training state, so each EMA's state goes
    in and comes out beside it (donated like it, and sharded like the weights under a
    `keras.distribution`), and the update reads the weights, the float non-trainable ones
    too, from the state the step returns. A step counts where it advanced the innermost
    optimizer's `iterations` (not with gradient accumulation's micro-steps, nor when
    `LossScaleOptimizer` skips it).
    """
    import jax

    opt = model.optimizer
    inner = _innermost(opt)
    where = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
    where |= {id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)}
    picks = [[where[id(v)] for v in o._tracked] for o in owners]
    every = inner.gradient_accumulation_steps or 1  # `iterations` is micro-steps // every
    counter = compat.step_counter(inner)
    (counted,) = [i for i, v in enumerate(opt.variables) if v is counter]
    skips = every > 1 or inner is not opt

    def step(state, emas, data):
        logs, new_state = model.train_step(state, data)
        applied = True
        if skips:
            before, after = state[2][counted] // every, new_state[2][counted] // every
            applied = ops.greater(after, before)
        emas = [
            (
                *o._next(
                    shadows, _as_stored([new_state[p][i] for p, i in pick]), steps, begin, applied
                ),
                begin,
            )
            for o, (shadows, steps, begin), pick in zip(owners, emas, picks, strict=True)
        ]
        return logs, new_state, emas

    if not model.run_eagerly and model.jit_compile:
        shardings = None
        if keras.distribution.distribution() is not None:
            one = _sharding(inner.iterations)  # replicated, for the step counts
            ema = [([_sharding(v) for v in o._tracked], one, one) for o in owners]
            shardings = (None, compat.jax_state_shardings(model), ema)
        step = jax.jit(step, donate_argnums=(0, 1), out_shardings=shardings)

    def one_step(state, data):
        logs, state, emas = step(state, [o._on_device() for o in owners], data)
        for o, ema in zip(owners, emas, strict=True):
            o._device = ema
        return logs, state

    return compat.jax_train_function(model, one_step)


def _as_stored(weights: list) -> list:
    """`weights` as the variables store them. XLA may otherwise hand a float16 or bfloat16
    weight to the float32 update before rounding it (its excess precision), so that the
    average would not be the average of the weights the model holds."""
    import jax

    kept = iter(jax.lax.optimization_barrier([w for w in weights if w.dtype.itemsize < 4]))
    return [next(kept) if w.dtype.itemsize < 4 else w for w in weights]


def _sharding(variable):
    return variable.value.sharding
