"""streamavg: constant-memory weighted averaging of Keras checkpoints.

>>> import streamavg
>>> streamavg.scheme_weights("equal", 2).tolist()
[0.5, 0.5]

The names below are imported on first use, so that the command line's `-h` and `-V`, and
any `import streamavg`, do not pay for numpy until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import StreamavgError, UsageError

if TYPE_CHECKING:
    from .api import Plan, Result, average, average_tensors, load_into_model, plan, run
    from .schemes import scheme_weights
    from .sweeps import Soup, Sweep, greedy_soup, sweep
    from .synthesis import phema

_LAZY = {
    **dict.fromkeys(
        ["Plan", "Result", "average", "average_tensors", "load_into_model", "plan", "run"], "api"
    ),
    "scheme_weights": "schemes",
    **dict.fromkeys(["Soup", "Sweep", "greedy_soup", "sweep"], "sweeps"),
    "phema": "synthesis",
}

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


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'streamavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
