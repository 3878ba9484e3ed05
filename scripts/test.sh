#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; includes the slow real-model tests: the README tour, about 31 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
