#!/usr/bin/env bash
# The [remote] extra at its declared floors: the remote tests again in .venv-floors, which
# holds those minimum versions (and the boto3 of their botocore, for moto's server) and
# takes every other package from .venv. Run by scripts/test.sh after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-floors/bin/python ] || python3 -m venv .venv-floors
floors=$(.venv/bin/python -c '
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["remote"]
print(" ".join(re.sub(r">=", "==", spec) for spec in extra))')
.venv-floors/bin/python -m pip install -q $floors
botocore=$(.venv-floors/bin/python -c 'import botocore; print(botocore.__version__)')
.venv-floors/bin/python -m pip install -q "boto3==$botocore"
site=$(.venv-floors/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$main')" > "$site/zz-streamavg-main-venv.pth"
.venv-floors/bin/python -m pip list 2>/dev/null | grep -iE '^(fsspec|s3fs|universal.pathlib|botocore) '
exec .venv-floors/bin/python -m pytest -q -p no:cacheprovider tests/test_remote.py
