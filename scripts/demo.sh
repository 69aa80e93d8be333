#!/usr/bin/env bash
# Install flowlog-shipper and run its self-contained demo (root, Linux with netfilter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/flowlog-shipper demo "$@"
