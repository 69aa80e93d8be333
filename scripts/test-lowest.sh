#!/usr/bin/env bash
# CI step: install the OLDEST versions pyproject.toml allows for every direct dependency
# (uv's --resolution lowest-direct) into a separate venv, .venv-lowest, and run the unit
# tests there, so the lower bounds we declare are ones the code really works with.
# Needs ./.venv from `bash scripts/install.sh --test` (it provides uv, from the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${VENV:-.venv}"  # the venv install.sh made (override to reuse another)
UV="$BASE/bin/uv"
PY="$("$BASE/bin/python" -c 'import sys; print(sys.executable)')"
rm -rf .venv-lowest
"$UV" venv -q --python "$PY" .venv-lowest
"$UV" pip install -q --python .venv-lowest/bin/python --resolution lowest-direct -e ".[test]"
echo "test-lowest.sh: oldest allowed direct dependencies:" >&2
"$UV" pip freeze --python .venv-lowest/bin/python >&2
.venv-lowest/bin/python -m pytest -q -p no:cacheprovider tests/unit "$@"
