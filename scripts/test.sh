#!/usr/bin/env bash
# Install everything and run the whole test suite: lint, type check, unit and kernel tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
.venv/bin/ruff check shipper tests bench scripts
.venv/bin/mypy        # the package (pyproject.toml [tool.mypy])
.venv/bin/mypy bench  # the benchmark scripts, which drive the package's internals
.venv/bin/mypy tests   # the tests (same settings)
.venv/bin/hadolint Dockerfile   # settings in .hadolint.yaml; manifests are checked by pytest
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
