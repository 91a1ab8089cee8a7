#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job. Extra arguments go to abd_fast.train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m abd_fast.train "$@"
