"""Demo: Polyak-Ruppert averaging of the last 10 Keras checkpoints on the "blobs" problem.

Trains a small MLP, saves epochs 490..499, averages them with ``python -m streamavg`` and
compares test accuracy of each single checkpoint against the averaged model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # must be set before TensorFlow is imported

import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
from tutorial import build_model, make_blobs  # the tutorial's data and model

SEED = 1
EPOCHS = 500
N_SAVED = 10
N_TRAIN = 100
ROOT = Path(__file__).resolve().parent.parent
OUT = Path("demo-out")
CKPTS = OUT / "ckpts"
AVERAGED = OUT / "averaged.keras"


class SaveFrom(keras.callbacks.Callback):
    """Save the full model as ``model_{epoch}.keras`` at the end of every epoch >= ``first``."""

    def __init__(self, first: int, directory: Path) -> None:
        super().__init__()
        self.first = first
        self.directory = directory

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch >= self.first:
            self.model.save(self.directory / f"model_{epoch}.keras")


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of the model stored at ``path`` (the average carries no optimizer state)."""
    model = keras.models.load_model(path, compile=False)
    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    return float(model.evaluate(x, y, verbose=0)[1])


def main() -> int:
    """Train, average with the streamavg CLI, evaluate; return a process exit code."""
    os.chdir(ROOT)
    shutil.rmtree(OUT, ignore_errors=True)
    CKPTS.mkdir(parents=True)

    x, labels = make_blobs(1100, centers=3, n_features=2, cluster_std=2.0, seed=2)
    y = keras.utils.to_categorical(labels, 3)
    x_train, y_train, x_test, y_test = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    keras.utils.set_random_seed(SEED)
    first = EPOCHS - N_SAVED
    print(f"Training {EPOCHS} epochs on {N_TRAIN} points; saving epochs {first}..{EPOCHS - 1}")
    build_model().fit(
        x_train, y_train, epochs=EPOCHS, verbose=0, callbacks=[SaveFrom(first, CKPTS)]
    )

    cmd = [sys.executable, "-m", "streamavg", str(CKPTS), "--scheme", "linear", "-o", str(AVERAGED)]
    print("\n$ " + " ".join(["python", *cmd[1:]]), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        print(f"\nerror: streamavg exited with status {rc}", file=sys.stderr)
        return rc

    singles = [CKPTS / f"model_{epoch}.keras" for epoch in range(first, EPOCHS)]
    results = {p: accuracy(p, x_test, y_test) for p in [*singles, AVERAGED]}
    width = max(len(str(p)) for p in results)
    print(f"\n{'file':<{width}}  test accuracy")
    for path, acc in results.items():
        print(f"{path!s:<{width}}  {acc:13.1%}")
    print(
        f"\nsingle (last epoch): {results[singles[-1]]:.1%}  "
        f"averaged (linear, {N_SAVED}): {results[AVERAGED]:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
