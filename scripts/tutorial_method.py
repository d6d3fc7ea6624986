"""The classic tutorial recipe for averaging Keras checkpoints, used as the benchmark peer.

It loads every model into memory at once, as the well-known Polyak-averaging tutorial does.
"""

import argparse
import re
from math import exp
from pathlib import Path

import keras
import numpy as np


def model_weight_ensemble(members: list, weights: list[float]) -> keras.Model:
    """Average the weights of all members layer by layer, exactly as the tutorial does."""
    n_layers = len(members[0].get_weights())
    avg_model_weights = []
    for layer in range(n_layers):
        layer_weights = np.array([model.get_weights()[layer] for model in members])
        avg_model_weights.append(np.average(layer_weights, axis=0, weights=weights))
    model = keras.models.clone_model(members[0])
    model.set_weights(avg_model_weights)
    return model


def scheme_weights(scheme: str, n: int, alpha: float) -> list[float]:
    """Newest-first weights for the equal, linear or exponential scheme."""
    if scheme == "equal":
        return [1 / n] * n
    if scheme == "linear":
        return [i / n for i in range(n, 0, -1)]
    return [exp(-i / alpha) for i in range(1, n + 1)]


def main() -> None:
    """Load all checkpoints in DIR, average them newest-first and save the result to OUT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scheme", choices=["equal", "linear", "exp"], default="equal")
    parser.add_argument("--alpha", type=float, default=2.0)
    args = parser.parse_args()

    paths = sorted(args.dir.iterdir(), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    members = [keras.models.load_model(p, compile=False) for p in paths]
    members.reverse()
    weights = scheme_weights(args.scheme, len(members), args.alpha)
    model_weight_ensemble(members, weights).save(args.out)


if __name__ == "__main__":
    main()
