"""The tutorial's experiment: is the average of the last n checkpoints better than one?

Trains the tutorial's MLP on 100 "blobs" points for 500 epochs, saves epochs 490-499 as
legacy .h5, and scores each saved model alone and the average of the last n (n = 1..10)
under equal, linear and exp (alpha = 2) weighting. The averages come from
`streamavg.sweep`: one streamed pass over the files per scheme, no model loaded per n.

    .venv/bin/python scripts/tutorial.py --outdir tutorial-out --json tutorial-out/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

import keras
import numpy as np

import streamavg
from streamavg.evaluate import keras_scorer

SCHEMES = ("equal", "linear", "exp")
N_TRAIN = 100


def make_blobs(n_samples: int, centers: int, n_features: int, cluster_std: float, seed: int):
    """scikit-learn's `make_blobs`, draw for draw, so the tutorial's data comes out the same."""
    rng = np.random.RandomState(seed)
    means = rng.uniform(-10.0, 10.0, size=(centers, n_features))
    counts = [n_samples // centers + (i < n_samples % centers) for i in range(centers)]
    x = np.concatenate(
        [
            rng.normal(loc=m, scale=cluster_std, size=(c, n_features))
            for m, c in zip(means, counts, strict=True)
        ]
    )
    y = np.repeat(np.arange(centers), counts)
    order = np.arange(n_samples)
    rng.shuffle(order)
    return x[order], y[order]


def build_model() -> keras.Model:
    """Dense(25, relu) -> Dense(3, softmax), SGD(0.01, momentum 0.9), categorical cross-entropy."""
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    return model


class SaveLast(keras.callbacks.Callback):
    """Save the whole model as `model_{epoch}.h5` after each of the last `count` epochs."""

    def __init__(self, directory: Path, first: int) -> None:
        super().__init__()
        self.directory, self.first = directory, first

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if epoch >= self.first:
            self.model.save(self.directory / f"model_{epoch}.h5")


def run(epochs: int, save_last: int, seed: int, outdir: Path) -> dict:
    """Train, save, score: the results as the JSON document describes them."""
    x, labels = make_blobs(1100, centers=3, n_features=2, cluster_std=2.0, seed=2)
    y = keras.utils.to_categorical(labels, 3)
    train, test = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    ckpts = outdir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    for old in ckpts.glob("model_*.h5"):
        old.unlink()
    np.savez(outdir / "test.npz", x=test[0], y=test[1])  # for `streamavg sweep --data`

    keras.utils.set_random_seed(seed)
    model = build_model()
    first = epochs - save_last
    history = model.fit(
        *train,
        validation_data=test,
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[SaveLast(ckpts, first)],
    ).history

    files = [ckpts / f"model_{e}.h5" for e in range(first, epochs)]
    evaluate, _, _ = keras_scorer(files[-1], outdir / "test.npz", "accuracy")
    results = {"single": {}}
    for epoch, path in enumerate(files, first):
        with streamavg.formats.open_checkpoint(path) as ck:
            tensors = {n: ck.read_whole(n) for n in ck.tensors}
        results["single"][epoch] = evaluate(tensors)
    for scheme in SCHEMES:
        sweep = streamavg.sweep(files, scheme, evaluate=evaluate, alpha=2.0)
        results[scheme] = sweep.scores
    results["final_train_acc"] = history["accuracy"][-1]
    results["final_test_acc"] = history["val_accuracy"][-1]
    results["history"] = {"train": history["accuracy"], "test": history["val_accuracy"]}
    return results


def table(results: dict) -> str:
    """Single-model accuracies, then averaged accuracy by n for each scheme."""
    epochs = list(results["single"])
    lines = [f"{'epoch':>5}  {'test acc':>8}"]
    lines += [f"{e:>5}  {results['single'][e]:8.4f}" for e in epochs]
    lines += ["", f"{'last n':>6}  " + "  ".join(f"{s:>7}" for s in SCHEMES)]
    for n in range(1, len(epochs) + 1):
        lines.append(f"{n:>6}  " + "  ".join(f"{results[s][n]:7.4f}" for s in SCHEMES))
    singles = np.mean(list(results["single"].values()))
    means = "  ".join(f"{s} {np.mean(list(results[s].values())):.4f}" for s in SCHEMES)
    lines += [
        "",
        f"final model: train {results['final_train_acc']:.4f}, "
        f"test {results['final_test_acc']:.4f}",
        f"mean single-model test accuracy {singles:.4f}; mean averaged: {means}",
    ]
    return "\n".join(lines)


def plot(results: dict, outdir: Path) -> list[Path]:
    """The tutorial's figures: learning curves, and single models (dots) against averages."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = [outdir / "learning_curves.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(results["history"]["train"], label="train")
    ax.plot(results["history"]["test"], label="test")
    ax.set(xlabel="epoch", ylabel="accuracy", title="Learning curves")
    ax.legend()
    fig.savefig(paths[0], dpi=100, bbox_inches="tight")
    plt.close(fig)

    singles = list(results["single"].values())[::-1]  # newest first, as n counts
    for scheme in SCHEMES:
        n = list(results[scheme])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(n, singles, "o", label="single model (n-th newest)")
        ax.plot(n, list(results[scheme].values()), "-", label=f"average of the last n ({scheme})")
        ax.set(xlabel="n", ylabel="test accuracy", title=f"{scheme} weighting")
        ax.legend()
        paths.append(outdir / f"average_{scheme}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the experiment, print the table, write plots and JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=500, help="training epochs (default 500)")
    p.add_argument("--save-last", type=int, default=10, help="checkpoints kept (default 10)")
    p.add_argument("--seed", type=int, default=1, help="Keras seed (default 1)")
    p.add_argument("--outdir", type=Path, default=Path("tutorial-out"))
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.save_last <= args.epochs:
        p.error("--save-last must be between 1 and --epochs")
    results = run(args.epochs, args.save_last, args.seed, args.outdir)
    print(table(results))
    for path in plot(results, args.outdir):
        print(f"wrote {path}")
    if args.json:
        document = {k: v for k, v in results.items() if k != "history"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
