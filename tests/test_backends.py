"""The callbacks' tests again on every other Keras backend that is installed.

A process has one Keras backend, chosen when Keras is first imported, so each backend runs
the callbacks' test modules in a pytest of its own (`KERAS_BACKEND`), with the same
references and assertions as this process's backend. A backend that cannot be imported
here is skipped, saying so: torch's wheels are too large for CI, and run where present.
Every backend runs `test_distributed.py` with two devices (`STREAMAVG_TEST_DEVICES=2`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

TESTS = Path(__file__).parent
MODULES = [
    "test_ema.py",
    "test_window_average.py",
    "test_batchnorm.py",
    "test_phema.py",
    "test_distributed.py",
]


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_the_callbacks_pass_their_tests_on_every_backend(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    # This process's backend ran the modules already, but on one device: two are set up
    # before the backend starts, in a process of their own (test_distributed.py).
    modules = MODULES if backend != keras.backend.backend() else ["test_distributed.py"]
    env = {**os.environ, "KERAS_BACKEND": backend, "STREAMAVG_TEST_DEVICES": "2"}
    if backend == "jax":  # two host devices
        env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, f"on {backend}: {summary}\n{done.stdout[-4000:]}"
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ skipped)?(, \d+ warnings?)? in .*", summary)
