#!/usr/bin/env bash
# The whole test suite: install what is missing, lint, then every test (real mounts; root).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
.venv/bin/ruff check cowfs tests benchmarks
exec .venv/bin/python -m pytest "$@"
