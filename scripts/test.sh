#!/usr/bin/env bash
# Create .venv if needed, install streamavg with its extras and the test dependency group
# (the versions pinned in constraints.txt), lint, type-check the public API, build the docs,
# and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip  # 25.1 or later: dependency groups
EXTRAS=tutorial,orbax,dask,remote
# pip compiles no byte code at install (a minute and a half for every file of torch,
# TensorFlow, transformers...); Python writes it for the modules the tests import.
unset PYTHONDONTWRITEBYTECODE
if [ "${STREAMAVG_NEWEST:-}" = 1 ]; then  # try the newest releases (then scripts/lock.sh)
    .venv/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-compile -e ".[$EXTRAS]" --group test
else  # the versions the tests last passed with, so that a new release cannot break CI overnight
    .venv/bin/python -m pip install -q -c constraints.txt --no-compile -e ".[$EXTRAS]" --group test
fi
.venv/bin/ruff check streamavg tests scripts
.venv/bin/ruff format --check streamavg tests scripts
.venv/bin/mypy  # the public API (pyproject.toml's [tool.mypy] files)
.venv/bin/pyright
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet  # warnings fail it; into site/
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/python -m pytest "$@"
scripts/floors.sh  # the [remote] extra at its declared minimum versions
scripts/keras_range.sh  # the callbacks' tests at the [keras] extra's oldest Keras (the newest: above)
