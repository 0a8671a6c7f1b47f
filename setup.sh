#!/usr/bin/env bash
# Quick start: install what is missing, then mount the example image and show its layers.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install.sh
exec .venv/bin/cowfs demo
