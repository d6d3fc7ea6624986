#!/usr/bin/env bash
# Newcomer demo: train a small Keras model, average its last 10 checkpoints with streamavg,
# and compare test accuracy. Needs only python3; creates .venv in the repo root if missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    echo "Creating virtualenv in .venv ..."
    python3 -m venv .venv
fi

echo "Installing streamavg with its TensorFlow extra (first run downloads TensorFlow) ..."
.venv/bin/pip install -q --disable-pip-version-check -e ".[tensorflow]"

# TF_CPP_MIN_LOG_LEVEL hides TensorFlow's C++ logs, except the few INFO lines absl prints before
# its logging is initialised; drop just those from stderr and keep everything else.
export TF_CPP_MIN_LOG_LEVEL=3
absl_noise='^(WARNING: All log messages before absl::InitializeLog\(\)|I0000 00:00:)'
{ .venv/bin/python scripts/demo.py "$@" 2>&1 1>&3 3>&- | { grep -Ev "$absl_noise" || true; } >&2; } 3>&1
