#!/usr/bin/env bash
# Create .venv if needed, install streamavg with its test extras, lint, and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/ruff check streamavg tests scripts
.venv/bin/ruff format --check streamavg tests scripts
export TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m pytest "$@"
