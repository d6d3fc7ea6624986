"""WindowAverage under real `model.fit` runs, against the offline averaging of the same epochs."""

from __future__ import annotations

import re
from functools import partial

import keras
import numpy as np
import pytest
from training import (
    FIT,
    VAL,
    X,
    Y,
    assert_close,
    assert_equal,
    in_order,
    make_model,
    make_unnamed_model,
    weights,
)

import streamavg
from streamavg.callbacks import WindowAverage


def shadow(avg: WindowAverage) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in avg.averaged_weights().items()}


@pytest.mark.parametrize("scheme, alpha", [("equal", 2.0), ("linear", 2.0), ("exp", 1.5)])
def test_equals_the_offline_average_of_the_same_epochs(tmp_path, scheme, alpha):
    saver = keras.callbacks.ModelCheckpoint(
        tmp_path / "e{epoch:02d}.weights.h5", save_weights_only=True
    )
    model, avg = make_model(), WindowAverage(scheme, alpha, start_epoch=2)
    model.fit(X, Y, epochs=6, callbacks=[saver, avg], **FIT)  # saver first: it saves raw weights
    offline = make_model()
    result = streamavg.load_into_model(offline, [tmp_path], scheme=scheme, alpha=alpha, last=4)
    assert [p.name for p in result.files] == [f"e0{e}.weights.h5" for e in (3, 4, 5, 6)]
    assert_close(weights(model), weights(offline))
    assert_equal(weights(model), {k: v.astype(np.float32) for k, v in shadow(avg).items()})


def test_validation_sees_raw_weights_before_the_window_and_the_average_within_it():
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.raw = weights(self.model)

        def on_test_begin(self, logs=None):
            seen.append((weights(self.model), self.raw, avg._count))

    model, avg = make_model(), WindowAverage("equal", start_epoch=1, final_weights="raw")
    model.fit(X, Y, epochs=3, validation_data=VAL, callbacks=[avg, Spy()], **FIT)
    (first, raw0, n0), (second, raw1, n1), (third, _, n2) = seen
    assert (n0, n1, n2) == (0, 1, 2)
    assert_equal(first, raw0)
    assert_equal(second, raw1)  # a window of one epoch is that epoch, exactly
    assert_close(third, {k: (raw1[k] + seen[2][1][k]) / 2 for k in raw1})


@pytest.mark.parametrize(
    "build, rebuild",  # rebuilt as a new process: "other-names" trades two equal layers' names
    [(make_model, make_model), (make_unnamed_model, partial(make_unnamed_model, swap=True))],
    ids=["same-names", "other-names"],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, build, rebuild):
    whole = build()
    whole.fit(X, Y, epochs=4, callbacks=[WindowAverage("linear")], **FIT)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("crash")

    def callbacks(*extra):
        backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
        return [backup, WindowAverage("linear", state_path=tmp_path / "avg.h5"), *extra]

    with pytest.raises(RuntimeError, match="crash"):
        build().fit(X, Y, epochs=4, callbacks=callbacks(Crash()), **FIT)
    resumed = rebuild()
    resumed.fit(X, Y, epochs=4, callbacks=callbacks(), **FIT)
    assert_equal(in_order(resumed), in_order(whole))


def test_a_layer_unfrozen_between_fits_is_averaged_from_then_on():
    ends = []

    class Ends(keras.callbacks.Callback):  # listed first: sees the raw weights
        def on_epoch_end(self, epoch, logs=None):
            ends.append(weights(self.model, trainable_only=False))

    model, avg = make_model(), WindowAverage("equal", non_trainable="copy")
    for trainable in (False, True):  # frozen, then fine-tuned
        model.get_layer("hidden").trainable = trainable
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="mse")
        model.fit(X, Y, epochs=2, callbacks=[Ends(), avg], **FIT)
    frozen = "mlp/hidden/kernel"
    np.testing.assert_array_equal(ends[1][frozen], ends[0][frozen])  # in the first fit
    assert_close(shadow(avg), {k: np.mean([e[k] for e in ends], axis=0) for k in ends[0]})


@pytest.mark.parametrize(
    "args, message",
    [
        ({"scheme": "median"}, "unknown scheme 'median'; choose from equal, linear, exp"),
        ({"scheme": "exp", "alpha": 0}, "alpha must be a positive number, got 0"),
        ({"start_epoch": -1}, "start_epoch must be an int >= 0; got -1"),
        ({"final_weights": "best"}, "final_weights must be one of 'average', 'raw'; got 'best'"),
    ],
)
def test_bad_arguments_are_refused_at_once(args, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        WindowAverage(**args)


def test_weights_file_is_written_only_once_the_window_has_begun(tmp_path):
    path = tmp_path / "avg.weights.h5"
    model, avg = make_model(), WindowAverage("equal", start_epoch=2, weights_path=path)
    model.fit(X, Y, epochs=2, callbacks=[avg], **FIT)
    assert not path.exists()
    model.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[avg], **FIT)
    loaded = make_model()
    loaded.load_weights(path)
    assert_equal(weights(loaded), {k: v.astype(np.float32) for k, v in shadow(avg).items()})
