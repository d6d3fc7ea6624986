"""WindowAverage: the tutorial's running average over the epochs of a window, in one copy."""

from __future__ import annotations

from ..errors import UsageError
from ..schemes import scheme_weights
from .averager import Averager, count_arg


class WindowAverage(Averager):
    """Averages the weights at the end of each epoch from `start_epoch` on, as the CLI would.

    Example:

    ```python
    avg = streamavg.callbacks.WindowAverage("linear", start_epoch=490)
    model.fit(x, y, epochs=500, callbacks=[avg])  # the model now holds the average
    ```

    At the end of epochs ``start_epoch .. e`` the shadow equals what
    ``python -m streamavg --scheme S`` gives for those epochs' checkpoints: the weights of
    `streamavg.scheme_weights`, newest heaviest. Because adding an epoch never changes the
    older epochs' relative weights, the n-th epoch folds in with the share its weight has
    among n, ``scheme_weights(scheme, n)[-1]``, and one float32 copy serves any window.

    Args:
        scheme: "equal", "linear" or "exp", as in the CLI.
        alpha: the exp scheme's alpha.
        start_epoch: the first epoch in the window (0-based, as `fit` counts them).
        validate, swap_on_epoch, final_weights, non_trainable, save_freq, state_path,
        weights_path, name: as for `EMA`; validation before `start_epoch` sees the raw
            weights.

    As for `EMA`, the variables to average are looked up again at the start of each `fit`,
    so a layer unfrozen in between joins the average, and the state file matches the
    averages to the model's variables by order and shape, not by name.

    In a custom training loop, call `avg.set_model(model)` once and `avg.update()` at the
    end of each epoch in the window.
    """

    def __init__(
        self,
        scheme: str = "linear",
        alpha: float = 2.0,
        *,
        start_epoch: int = 0,
        name: str = "avg",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        try:
            scheme_weights(scheme, 1, alpha=alpha)
        except UsageError as e:
            raise ValueError(str(e)) from None
        self.scheme = scheme
        self.alpha = alpha
        self.start_epoch = count_arg("start_epoch", start_epoch, 0)
        self._count = 0  # epochs folded in
        self._folded = False  # whether this epoch is folded in yet

    def update(self) -> None:
        """Fold in the model's current weights as the window's newest epoch."""
        if not self._tracking:
            self._build()
        self._count += 1
        self._fold(float(scheme_weights(self.scheme, self._count, alpha=self.alpha)[-1]))

    def _ready(self) -> bool:
        return self._count > 0

    def _fold_epoch(self) -> None:
        if self._epoch >= self.start_epoch and not self._folded:
            self._folded = True
            self.update()

    def _before_validation(self) -> None:
        self._fold_epoch()

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._folded = False

    def on_epoch_end(self, epoch, logs=None):
        self._fold_epoch()
        super().on_epoch_end(epoch, logs)

    def _start(self) -> None:
        self._count = 0

    def _config(self) -> dict:
        return {"scheme": self.scheme, "alpha": self.alpha, "start_epoch": self.start_epoch}

    def _counters(self) -> dict[str, int]:
        return {"count": self._count}

    def _set_counters(self, counters: dict[str, int]) -> None:
        self._count = counters["count"]
