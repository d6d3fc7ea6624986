"""streamavg: constant-memory weighted averaging of Keras checkpoints.

>>> import streamavg
>>> streamavg.scheme_weights("equal", 2).tolist()
[0.5, 0.5]
"""

from ._version import __version__
from .api import Plan, Result, average, average_tensors, load_into_model, plan, run
from .errors import StreamavgError, UsageError
from .schemes import scheme_weights
from .sweeps import Soup, Sweep, greedy_soup, sweep
from .synthesis import phema

__all__ = [
    "Plan",
    "Result",
    "Soup",
    "StreamavgError",
    "Sweep",
    "UsageError",
    "__version__",
    "average",
    "average_tensors",
    "greedy_soup",
    "load_into_model",
    "phema",
    "plan",
    "run",
    "scheme_weights",
    "sweep",
]
