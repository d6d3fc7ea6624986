"""Post-hoc EMA on the tutorial's problem: train once with PostHocEMA, then score EMAs of
24 lengths on held-out data and plot the test loss against sigma_rel, as EDM2's figures do.

    .venv/bin/python scripts/phema_example.py --outdir phema-out --plot docs/phema_sweep.png
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

import keras
import numpy as np
from tutorial import build_model, make_blobs

from streamavg.callbacks import PostHocEMA
from streamavg.cli import main as streamavg
from streamavg.evaluate import keras_scorer
from streamavg.synthesis import parse_sweep, sweep

STORED = (0.05, 0.10)
SWEEP = "0.02:0.25:24"
N_TRAIN = 1000  # enough not to overfit: late in training the weights just wander
LEARNING_RATE, BATCH, EVERY = 0.1, 10, 200  # noisy SGD; a snapshot every 200 steps


def train(outdir: Path, epochs: int) -> tuple[Path, Path, float]:
    """Train with PostHocEMA; return its directory, the test data file and the raw loss."""
    x, labels = make_blobs(N_TRAIN + 1000, centers=3, n_features=2, cluster_std=2.0, seed=2)
    y = keras.utils.to_categorical(labels, 3)
    outdir.mkdir(parents=True, exist_ok=True)
    data = outdir / "test.npz"
    np.savez(data, x=x[N_TRAIN:], y=y[N_TRAIN:])
    keras.utils.set_random_seed(1)
    model = build_model()  # then a learning rate high enough for the weights to be noisy
    optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=0.9)
    model.compile(optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    snapshots = outdir / "snapshots"
    phema = PostHocEMA(snapshots, STORED, every_steps=EVERY)
    fit = {"epochs": epochs, "batch_size": BATCH, "verbose": 0, "callbacks": [phema]}
    model.fit(x[:N_TRAIN], y[:N_TRAIN], **fit)
    raw = model.evaluate(x[N_TRAIN:], y[N_TRAIN:], verbose=0, return_dict=True)["loss"]
    return snapshots, data, raw


def plot(scores: dict[float, float], raw: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(list(scores), list(scores.values()), "o-", ms=3, label="post-hoc EMA")
    for s in STORED:
        ax.axvline(s, color="grey", lw=0.8, ls=":")
    best = min(scores, key=scores.get)
    ax.plot([best], [scores[best]], "*", ms=12, color="C2", label=f"best: {best:.3f}")
    ax.set(xlabel="sigma_rel (dotted: the two stored)", ylabel="test loss")
    ax.set_title(f"EMAs chosen after training (the last weights: {raw:.3f})", fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outdir", type=Path, default=Path("phema-out"))
    parser.add_argument("--epochs", type=int, default=30, help="of 100 steps each")
    parser.add_argument("--plot", type=Path, help="write the figure here (needs matplotlib)")
    args = parser.parse_args()
    snapshots, data, raw = train(args.outdir, args.epochs)
    evaluate, _, _ = keras_scorer(snapshots / "model.keras", data, "loss")
    scores = sweep(snapshots, parse_sweep(SWEEP), evaluate=evaluate)
    print(f"last weights: test loss {raw:.4f}")
    for s in sorted({*STORED, min(scores, key=scores.get)}):
        print(f"sigma_rel {s:.4f}: test loss {evaluate_width(snapshots, s, evaluate):.4f}")
    if args.plot:
        plot(scores, raw, args.plot)
    # The command line does the same sweep and writes the best EMA.
    out = args.outdir / "best.weights.h5"
    streamavg(["phema", str(snapshots), "--sweep", SWEEP, "--data", str(data), "-o", str(out),
               "--metric", "loss", "--overwrite", "-q"])  # fmt: skip


def evaluate_width(snapshots: Path, sigma_rel: float, evaluate) -> float:
    return sweep(snapshots, [sigma_rel], evaluate=evaluate)[sigma_rel]


if __name__ == "__main__":
    main()
