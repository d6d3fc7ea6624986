"""The Keras releases the callbacks support, and every Keras (and torch) internal they use.

The callbacks reach into Keras where it has no public API for what they do: the train
step's optimizer call, JAX's compiled train function, fit's validation call. Each such use
is one small function here, saying what it relies on and in which Keras releases that was
checked, so that a new Keras release is a change to this module only. Outside the range
`SUPPORTED` (tested at both ends by scripts/keras_range.sh and scripts/test.sh), the
callbacks refuse to start rather than misbehave later.

The range must equal the `[keras]` extra's in pyproject.toml (a test compares them). Its
floor is the oldest release the callbacks' tests pass with: Keras 3.10 passes
`on_train_batch_end` the first batch of each `steps_per_execution` run, not the last, so
`PostHocEMA` takes its snapshots later than due; 3.9 and older also cannot give a new
variable a sharding layout (`keras.Variable(layout=)`), which the averages under a
`keras.distribution` need.
"""

from __future__ import annotations

import functools
import re

FLOOR = (3, 11)  # the oldest Keras release the callbacks' tests pass with
CEILING = (3, 16)  # the first one not tested (the newest tested is 3.15.1)
SUPPORTED = f">={FLOOR[0]}.{FLOOR[1]},<{CEILING[0]}.{CEILING[1]}"


def check_keras_version(version: str) -> None:
    """Raise RuntimeError, in one line, unless Keras `version` is in the supported range."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or not FLOOR <= (int(found[1]), int(found[2])) < CEILING:
        raise RuntimeError(
            f"streamavg.callbacks needs Keras {SUPPORTED}, not {version}: "
            "pip install 'streamavg[keras]'"
        )


@functools.cache
def require_supported_keras() -> None:
    """`check_keras_version` of the Keras imported here (checked once per process)."""
    import keras

    check_keras_version(keras.__version__)


# -- variables -----------------------------------------------------------------------


def layout_of(variable):
    """`variable`'s sharding layout under a `keras.distribution`, or None: the private
    `_layout` of Keras's variables (3.5 to 3.15), as `keras.Variable(layout=)` takes it
    (3.10 to 3.15; 3.9 has no `layout`)."""
    return getattr(variable, "_layout", None)


def sublayers(model) -> list:
    """Every layer inside `model`, nested ones too, not `model` itself: the private
    `Layer._flatten_layers` (3.0 to 3.15; Keras has no public recursive list)."""
    return list(model._flatten_layers(include_self=False))


# -- the optimizer -------------------------------------------------------------------


def step_counter(optimizer):
    """The variable that counts `optimizer`'s `apply` calls, gradient accumulation's
    micro-steps too (public `iterations` divides it by the accumulation steps): the private
    `BaseOptimizer._iterations` (3.5 to 3.15)."""
    return optimizer._iterations


def hook_apply(optimizer, hook) -> None:
    """Make `optimizer.apply(grads, trainable_variables)` call
    ``hook(apply, grads, trainable_variables)`` instead, `apply` being the method it
    replaces: relies on TensorFlow's and torch's train steps (and `LossScaleOptimizer`)
    calling `apply` as an attribute of the optimizer (3.0 to 3.15)."""
    optimizer.apply = functools.partial(hook, optimizer.apply)


def unhook_apply(optimizer) -> None:
    """Undo `hook_apply`, if `optimizer` has a hook (its class's `apply` again)."""
    if "apply" in vars(optimizer):
        del optimizer.apply


def lerp_(values: list, ends: list, share: float) -> None:
    """torch: ``values[i] += share * (ends[i] - values[i])`` in place, in one fused kernel:
    the private `torch._foreach_lerp_` (torch 2.0 to 2.13, as torch's own Adam uses it)."""
    import torch

    with torch.no_grad():
        torch._foreach_lerp_(values, ends, share)  # pyright: ignore[reportPrivateImportUsage]


# -- fit -----------------------------------------------------------------------------


def is_fit_validation(evaluate_kwargs: dict) -> bool:
    """Whether a `model.evaluate` call is `fit`'s validation: every backend's `fit`
    passes the private `_use_cached_eval_dataset=True` (3.0 to 3.15)."""
    return bool(evaluate_kwargs.get("_use_cached_eval_dataset"))


def jax_state_shardings(model) -> tuple:
    """The shardings of JAX's train-step state (trainable, non-trainable, optimizer and
    metrics variables), for `jax.jit`'s `out_shardings`: what Keras's private
    `_get_state_sharding_spec` (3.12 to 3.15) gives, from public attributes."""
    optimizer = getattr(model, "optimizer", None)
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        optimizer.variables if optimizer is not None else [],
        model.metrics_variables,
    )
    return tuple([v.value.sharding for v in group] for group in groups)


def jax_train_function(model, step):
    """`model`'s train function from a JAX train step ``step(state, data)``, running
    `steps_per_execution` steps per call: the private `JAXTrainer._make_function`
    (3.8 to 3.15)."""
    return model._make_function(step)


# -- metrics -------------------------------------------------------------------------


def metric_direction(metric) -> str | None:
    """Which way `metric` improves, "up" or "down", where Keras says (else None): the
    private `Metric._direction` that Keras's monitor callbacks read (3.0 to 3.15)."""
    return getattr(metric, "_direction", None)
