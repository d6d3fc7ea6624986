#!/usr/bin/env bash
# Create .venv if needed, install streamavg with its test extras (the versions pinned in
# constraints.txt), lint, and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${STREAMAVG_NEWEST:-}" = 1 ]; then  # try the newest releases (then scripts/lock.sh)
    .venv/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
else  # the versions the tests last passed with, so that a new release cannot break CI overnight
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
fi
.venv/bin/ruff check streamavg tests scripts
.venv/bin/ruff format --check streamavg tests scripts
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/python -m pytest "$@"
scripts/floors.sh  # the [remote] extra at its declared minimum versions
