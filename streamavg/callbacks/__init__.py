"""Keras callbacks that average weights during training (imports Keras; the CLI never does).

>>> from streamavg.callbacks import EMA  # doctest: +SKIP
>>> model.fit(x, y, validation_data=val, callbacks=[EMA(decay=0.999)])  # doctest: +SKIP
"""

try:
    from keras import ops  # noqa: F401  (Keras 2 has none)
except ImportError:
    raise ImportError("streamavg.callbacks needs Keras 3: pip install 'streamavg[keras]'") from None

from .batchnorm import recalibrate_batchnorm
from .ema import EMA
from .posthoc_ema import PostHocEMA
from .window_average import WindowAverage

__all__ = ["EMA", "PostHocEMA", "WindowAverage", "recalibrate_batchnorm"]
