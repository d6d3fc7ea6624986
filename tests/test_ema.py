"""The EMA callback under real `model.fit` runs, against a float64 numpy reference."""

from __future__ import annotations

import json
import math
import re
from functools import partial

import h5py
import keras
import numpy as np
import pytest
from training import (
    FIT,
    VAL,
    Recorder,
    X,
    Y,
    assert_close,
    assert_equal,
    in_order,
    make_model,
    make_unnamed_model,
    reference,
    shadow,
    weights,
)

from streamavg.callbacks import EMA


@pytest.mark.parametrize(
    "args, ref",
    [
        ({"decay": 0.9}, {"decay": 0.9}),
        ({"decay": 0.8, "warmup": True}, {"decay": 0.8, "warmup": True}),
        ({"decay": 0.9, "update_every": 3}, {"decay": 0.9, "every": 3}),
        ({"decay": 0.9, "start_step": 5}, {"decay": 0.9, "start": 5}),
        ({"decay": 0.9, "start_epoch": 1}, {"decay": 0.9, "start": 8}),
        ({"half_life_steps": 4.0}, {"decay": 0.5**0.25}),
        ({"half_life_epochs": 0.5}, {"decay": 0.5**0.25}),
        ({"decay": 0.95, "warmup": True, "update_every": 2, "start_step": 3},
         {"decay": 0.95, "warmup": True, "every": 2, "start": 3}),
    ],
)  # fmt: skip
def test_matches_the_numpy_reference(args, ref):
    model, rec = make_model(), Recorder()
    ema = EMA(**args)
    model.fit(X, Y, epochs=3, callbacks=[ema, rec], **FIT)
    assert_close(shadow(ema), reference(rec.steps, **ref))
    assert math.isclose(ema.decay, ref["decay"], rel_tol=1e-12)


def test_validation_sees_the_average_and_training_goes_on_from_bit_exact_raw_weights():
    plain = make_model()
    plain_history = plain.fit(X, Y, epochs=3, validation_data=VAL, **FIT).history

    seen = []

    class Spy(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append((weights(self.model), shadow(ema)))

    model, ema = make_model(), EMA(decay=0.9, final_weights="raw")
    history = model.fit(X, Y, epochs=3, validation_data=VAL, callbacks=[ema, Spy()], **FIT)
    assert len(seen) == 3
    for in_model, average in seen:
        assert_equal(
            in_model, {k: v.astype(np.float32).astype(np.float64) for k, v in average.items()}
        )
    assert_equal(weights(model), weights(plain))
    assert history.history["loss"] == plain_history["loss"]
    assert history.history["val_loss"] != plain_history["val_loss"]


def test_validate_both_reports_raw_and_average_metrics():
    plain = make_model()
    plain_history = plain.fit(X, Y, epochs=2, validation_data=VAL, **FIT).history
    model, ema = make_model(), EMA(decay=0.9, validate="both")
    history = model.fit(X, Y, epochs=2, validation_data=VAL, callbacks=[ema], **FIT).history
    assert sorted(history) == ["loss", "val_ema_loss", "val_loss"]
    assert history["val_loss"] == plain_history["val_loss"]
    # The model now holds the average, so evaluating it repeats the last val_ema_loss.
    assert model.evaluate(*VAL, verbose=0, batch_size=8) == history["val_ema_loss"][-1]


def test_an_exception_during_validation_leaves_the_raw_weights_in_place():
    raw = {}

    class Fail(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw.update(weights(self.model))

        def on_test_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, epochs=2, validation_data=VAL, callbacks=[EMA(decay=0.9), Fail()], **FIT)
    assert_equal(weights(model), raw)
    assert "evaluate" not in vars(model)


def test_final_weights_and_a_second_fit_that_trains_on_from_the_raw_weights():
    plain = make_model()
    plain.fit(X, Y, epochs=2, **FIT)
    after_first = weights(plain)
    plain.fit(X, Y, epochs=2, **FIT)

    model, rec, ema = make_model(), Recorder(), EMA(decay=0.9)
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    assert_equal(weights(model), {k: v.astype(np.float32) for k, v in shadow(ema).items()})
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    assert_equal(rec.steps[17], after_first)  # the second fit started from the raw weights
    assert_close(shadow(ema), reference(rec.steps[:17] + rec.steps[18:], 0.9))


def test_a_second_fit_keeps_weights_loaded_in_between():
    model, ema = make_model(), EMA(decay=0.9)
    model.fit(X, Y, epochs=1, callbacks=[ema], **FIT)
    other = make_model()
    model.set_weights(other.get_weights())
    rec = Recorder()
    model.fit(X, Y, epochs=1, callbacks=[ema, rec], **FIT)
    assert_equal(rec.steps[0], weights(other))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gradient_accumulation_folds_after_each_real_update(k):
    model, rec = make_model(gradient_accumulation_steps=k), Recorder()
    ema = EMA(half_life_epochs=1.0)
    model.fit(X[:48], Y[:48], epochs=3, callbacks=[ema, rec], **FIT)  # 6 batches an epoch
    assert math.isclose(ema.decay, 0.5 ** (k / 6), rel_tol=1e-12)  # 6 / k updates an epoch
    pairs = zip(rec.steps[1:], rec.iterations[:-1], rec.iterations[1:], strict=True)
    updated = [w for w, before, after in pairs if after > before]
    assert len(updated) == 18 // k == ema._counters()["steps"]
    assert_close(shadow(ema), reference([rec.steps[0], *updated], ema.decay))


def test_steps_a_loss_scale_optimizer_skips_are_left_out():
    model, rec = make_model(dtype="mixed_float16"), Recorder()
    inner = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    # A scale this large overflows float16 gradients until it has been halved a few times.
    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**22)
    model.compile(optimizer=optimizer, loss="mse")
    ema = EMA(decay=0.8)
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    changed = [b for a, b in zip(rec.steps, rec.steps[1:], strict=False) if not all(
        np.array_equal(a[k], b[k]) for k in a)]  # fmt: skip
    assert 0 < len(changed) < 16
    assert ema._counters()["steps"] == len(changed) == int(inner.iterations.numpy())
    assert_close(shadow(ema), reference([rec.steps[0], *changed], 0.8))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_keep_a_float32_shadow(dtype):
    model, rec = make_model(dtype=dtype), Recorder()
    ema = EMA(decay=0.99)
    model.fit(X, Y, epochs=2, callbacks=[ema, rec], **FIT)
    assert {str(s.dtype) for s in ema._shadow} == {"float32"}
    assert {str(v.dtype) for v in model.trainable_variables} == {dtype}
    want = reference(rec.steps, 0.99)
    assert_close(shadow(ema), want)


@pytest.mark.parametrize("policy", ["average", "copy"])
def test_batchnorm_statistics_policy(policy):
    model, rec = make_model(batchnorm=True), Recorder(trainable_only=False)
    ema = EMA(decay=0.9, non_trainable=policy, final_weights="raw")
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append(weights(self.model, trainable_only=False))

    model.fit(X, Y, epochs=2, validation_data=VAL, callbacks=[ema, rec, Spy()], **FIT)
    stats = [v.path for v in model.non_trainable_variables]
    want = reference(rec.steps, 0.9)
    if policy == "average":
        assert_close(shadow(ema), want)
        assert_close({k: seen[-1][k] for k in stats}, {k: want[k] for k in stats})
    else:
        assert not set(stats) & set(ema.averaged_weights())
        assert_equal({k: seen[-1][k] for k in stats}, {k: rec.steps[-1][k] for k in stats})


@pytest.mark.parametrize("policy", ["copy", "average"])
def test_a_layer_unfrozen_between_fits_is_averaged_from_then_on(policy):
    model, rec = make_model(), Recorder(trainable_only=False)
    ema = EMA(decay=0.9, non_trainable=policy)
    for trainable in (False, True):  # frozen, then fine-tuned
        model.get_layer("hidden").trainable = trainable
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="mse")
        model.fit(X, Y, epochs=1, callbacks=[ema, rec], **FIT)
    frozen = ["mlp/hidden/kernel", "mlp/hidden/bias"]
    assert_equal({k: rec.steps[8][k] for k in frozen}, {k: rec.steps[0][k] for k in frozen})
    assert_equal(rec.steps[9], rec.steps[8])  # the second fit trains on from the raw weights
    assert_close(shadow(ema), reference(rec.steps[:9] + rec.steps[10:], 0.9))


def test_early_stopping_restores_the_best_average_and_model_checkpoint_saves_it(tmp_path):
    at_epoch_end = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            at_epoch_end.append({k: v.astype(np.float32) for k, v in shadow(ema).items()})

    model, ema = make_model(learning_rate=0.1), EMA(decay=0.5)
    best = tmp_path / "best.weights.h5"
    callbacks = [
        Spy(),
        ema,
        keras.callbacks.ModelCheckpoint(best, save_best_only=True, save_weights_only=True),
        keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True),
    ]
    history = model.fit(X, Y, epochs=8, validation_data=VAL, callbacks=callbacks, **FIT).history
    best_epoch = int(np.argmin(history["val_loss"]))
    assert best_epoch < len(history["val_loss"]) - 1 < 7  # it stopped early, after the best
    assert_equal(
        weights(model), {k: v.astype(np.float64) for k, v in at_epoch_end[best_epoch].items()}
    )
    saved = make_model()
    saved.load_weights(best)
    assert_equal(weights(saved), weights(model))


RENAMED = [  # (build, rebuild as a new process, whether that changes the variable paths)
    (make_model, make_model, False),
    (make_unnamed_model, partial(make_unnamed_model, swap=True), True),
]


@pytest.mark.parametrize("build, rebuild, renamed", RENAMED, ids=["same-names", "other-names"])
def test_resume_from_the_state_file_with_backup_and_restore_equals_an_uninterrupted_run(
    tmp_path, build, rebuild, renamed
):
    whole, ema = build(), EMA(decay=0.9)
    whole.fit(X, Y, epochs=4, callbacks=[ema], **FIT)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("crash")

    state, weights_file = tmp_path / "ema.state.h5", tmp_path / "ema.weights.h5"

    def callbacks(*extra):
        backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
        return [backup, EMA(decay=0.9, state_path=state, weights_path=weights_file), *extra]

    crashed = build()
    with pytest.raises(RuntimeError, match="crash"):
        crashed.fit(X, Y, epochs=4, callbacks=callbacks(Crash()), **FIT)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup",
        "ema.state.h5",
        "ema.weights.h5",
    ]
    resumed = rebuild()  # as a new process: "other-names" trades two equal layers' names
    paths = [list(weights(m)) for m in (crashed, resumed)]
    assert sorted(paths[0]) == sorted(paths[1])  # each path is in the state file...
    assert (paths[0] != paths[1]) == renamed  # ...but, renamed, for another variable
    resumed.fit(X, Y, epochs=4, callbacks=callbacks(), **FIT)
    assert_equal(in_order(resumed), in_order(whole))
    standalone = rebuild()
    standalone.load_weights(weights_file)
    assert_equal(in_order(standalone), in_order(whole))


def test_a_state_file_for_other_variables_is_refused(tmp_path):
    state = tmp_path / "ema.state.h5"
    saved = EMA(decay=0.9)
    saved.set_model(make_model())
    saved.save_state(state)
    wider = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="mlp",
    )
    for model, message in [
        (wider, f"{state}: averaged variable 0 (mlp/hidden/kernel) has shape (4, 16), but the "
                "file's variable 0 (mlp/hidden/kernel) has shape (4, 8)"),
        (make_unnamed_model(), f"{state}: holds 4 averaged variables, but this model has 8"),
    ]:  # fmt: skip
        model.compile(optimizer="sgd", loss="mse")
        ema = EMA(decay=0.9)
        ema.set_model(model)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            ema.load_state(state)


def test_a_state_file_from_before_0_2_is_refused(tmp_path):
    """0.1 stored each shadow under its variable's path, which a new process may name
    differently: such a file is refused, not matched by name."""
    import json

    import h5py

    model = make_model()
    ema = EMA(decay=0.9)
    ema.set_model(model)
    state = tmp_path / "ema.state.h5"
    ema.save_state(state)
    with h5py.File(state, "a") as f:  # rewrite it as 0.1 did
        saved = json.loads(f.attrs["streamavg_state"])
        f.attrs["streamavg_state"] = json.dumps({**saved, "streamavg": "0.1.0"})
        for i, v in enumerate(model.trainable_variables):
            f[v.path] = f[f"shadow/{i}"][()]
        del f["shadow"]
    message = (
        f"{state}: written by streamavg 0.1.0, whose state files this version does not read; "
        "remove it to start afresh"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ema.load_state(state)


def test_a_state_file_from_another_point_of_training_is_refused(tmp_path):
    state = tmp_path / "ema.state.h5"
    first = EMA(decay=0.9, state_path=state, delete_state=False)
    make_model().fit(X, Y, epochs=1, callbacks=[first], **FIT)
    with pytest.raises(ValueError, match=re.escape(
        f"{state}: saved at optimizer step 8, but the model is at step 0; restore the matching "
        "weights first (for example with keras.callbacks.BackupAndRestore) or remove the file "
        "to start afresh"
    )):  # fmt: skip
        make_model().fit(X, Y, epochs=1, callbacks=[EMA(decay=0.9, state_path=state)], **FIT)
    with pytest.raises(ValueError, match=re.escape(f"{state}: saved by {{'kind': 'EMA', 'config'")):
        make_model().fit(X, Y, epochs=1, callbacks=[EMA(decay=0.8, state_path=state)], **FIT)


def test_state_saved_every_n_batches_and_removed_when_fit_completes(tmp_path):
    state = tmp_path / "ema.state.h5"

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                raise KeyboardInterrupt

    model, rec = make_model(), Recorder()
    ema = EMA(decay=0.9, state_path=state, save_freq=3)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, epochs=1, callbacks=[ema, rec, Crash()], **FIT)
    with h5py.File(state) as f:  # written after the third step, not since
        saved = json.loads(f.attrs["streamavg_state"])
        stored = [f[f"shadow/{i}"] for i in range(len(f["shadow"]))]  # by position
        values = {d.attrs["path"]: d[()].astype(np.float64) for d in stored}
    assert saved["counters"] == {"steps": 3, "begin": 0} and saved["optimizer_step"] == 3
    assert_close(values, reference(rec.steps[:4], 0.9))
    model.fit(X, Y, epochs=1, callbacks=[ema], **FIT)  # the same object goes on from memory
    assert ema._counters()["steps"] == 13
    assert not state.exists()


@pytest.mark.parametrize("compile_again", [False, True])
def test_an_interrupted_fit_leaves_nothing_in_the_way(compile_again):
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    model, old = make_model(), EMA(decay=0.9)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, epochs=1, validation_data=VAL, callbacks=[old, Stop()], **FIT)
    assert model.evaluate(*VAL, verbose=0) == type(model).evaluate(model, *VAL, verbose=0)
    if compile_again:  # Keras makes a new train function; the optimizer stays
        model.compile(optimizer=model.optimizer, loss="mse")
    before = shadow(old)
    new, rec = EMA(decay=0.8), Recorder()
    model.fit(X, Y, epochs=1, validation_data=VAL, callbacks=[new, rec], **FIT)
    assert_equal(shadow(old), before)  # the interrupted EMA's hook was dropped
    assert_close(shadow(new), reference(rec.steps, 0.8))


def test_other_evaluate_calls_during_fit_are_left_alone():
    results = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            patched = self.model.evaluate(*VAL, verbose=0)  # return_dict=False
            results.append((patched, type(self.model).evaluate(self.model, *VAL, verbose=0)))

    model, ema = make_model(), EMA(decay=0.9, validate="both", swap_on_epoch=False)
    model.fit(X, Y, epochs=2, validation_data=VAL, callbacks=[ema, Probe()], **FIT)
    assert [patched for patched, _ in results] == [plain for _, plain in results]  # raw weights
    assert all(isinstance(patched, float) for patched, _ in results)


def test_custom_training_loop_with_update_and_swapped():
    model, ema = make_model(), EMA(decay=0.9)
    ema.set_model(model)
    steps = [weights(model)]
    for i in range(0, 64, 8):
        model.train_on_batch(X[i : i + 8], Y[i : i + 8])
        ema.update()
        steps.append(weights(model))
    assert_close(shadow(ema), reference(steps, 0.9))
    with ema.swapped():
        assert_equal(weights(model), {k: v.astype(np.float32) for k, v in shadow(ema).items()})
    assert_equal(weights(model), steps[-1])


def test_two_averages_at_once_and_only_one_validates():
    model, rec = make_model(), Recorder()
    fast = EMA(decay=0.5, validate="raw", name="fast")
    slow = EMA(decay=0.9, validate="both", name="slow")
    history = model.fit(X, Y, epochs=1, validation_data=VAL, callbacks=[fast, slow, rec], **FIT)
    assert sorted(history.history) == ["loss", "val_loss", "val_slow_loss"]
    assert_close(shadow(fast), reference(rec.steps, 0.5))
    assert_close(shadow(slow), reference(rec.steps, 0.9))
    message = "only one averaging callback per fit can validate; pass validate='raw' to the others"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.fit(X, Y, epochs=1, validation_data=VAL, callbacks=[EMA(), EMA()], **FIT)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"decay": 1.0}, "decay must be between 0 and 1 (exclusive); got 1.0"),
        ({"decay": 0.9, "half_life_steps": 3}, "give only one of decay, half_life_steps"),
        ({"half_life_epochs": 0}, "half_life_epochs must be positive; got 0"),
        ({"update_every": 0}, "update_every must be an int >= 1; got 0"),
        ({"start_step": -1}, "start_step must be an int >= 0; got -1"),
        ({"start_step": 2, "start_epoch": 1}, "give start_step or start_epoch, not both"),
        ({"validate": "ema"}, "validate must be one of 'average', 'raw', 'both'; got 'ema'"),
        ({"save_freq": 0}, "save_freq must be 'epoch' or a positive int; got 0"),
        ({"weights_path": "x.h5"}, "weights_path must end in .weights.h5; got 'x.h5'"),
        ({"name": "a b"}, "name must be an identifier, used in metric names; got 'a b'"),
    ],
)
def test_bad_arguments_are_refused_at_once(args, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        EMA(**args)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch runs one step a call")
def test_the_update_runs_inside_the_train_step_not_between_batches():
    plain, rec = make_model(), Recorder()
    plain.fit(X, Y, epochs=2, callbacks=[rec], **FIT)
    model = make_model()
    model.compile(optimizer=model.optimizer, loss="mse", steps_per_execution=4)
    ema = EMA(decay=0.8)
    model.fit(X, Y, epochs=2, callbacks=[ema], **FIT)  # batch hooks see every 4th step only
    assert_close(shadow(ema), reference(rec.steps, 0.8))
    assert "apply" not in vars(model.optimizer)  # unhooked after fit


def test_later_fits_reuse_the_traced_train_step_and_average_across_fits():
    model, rec, ema, seen = make_model(), Recorder(), EMA(decay=0.9), []

    class Look(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.train_function)

    bare = []
    for _ in range(3):
        model.fit(X, Y, epochs=1, callbacks=[ema, rec, Look()], **FIT)
        bare.append(model.train_function)
    assert len(set(map(id, seen))) == 1  # one train function with the update, for every fit
    assert len(set(map(id, bare))) == 1 and bare[0] is not seen[0]  # Keras's own, in between
    steps = [s for i, s in enumerate(rec.steps) if i % 9 or i == 0]  # each fit's start repeats
    assert_close(shadow(ema), reference(steps, 0.9))
