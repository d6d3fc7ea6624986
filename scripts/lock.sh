#!/usr/bin/env bash
# Write constraints.txt from .venv: the versions the tests passed with, which scripts/test.sh
# installs by default. To try the newest releases: STREAMAVG_NEWEST=1 scripts/test.sh, then
# run this if they pass. torch is pinned without its local build tag (+cpu), so either build fits.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# The versions the tests last passed with (scripts/lock.sh); scripts/test.sh installs these."
    .venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > constraints.txt
