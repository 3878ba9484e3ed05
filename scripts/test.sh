#!/usr/bin/env bash
# Set up .venv, then run the tests (CPU). Tiers:
#   bash scripts/test.sh           the fast tier: unit, exactness and integration tests on tiny models (< 10 min on 2 cores)
#   bash scripts/test.sh --slow    the slow tier: every README and guide command with the real Gemma 3 270M (the main
#                                  job included), real-model checks, multi-process (DDP / FSDP2) training
#   bash scripts/test.sh --all     both
# Any other argument goes to pytest (e.g. -k NAME, -x, --durations=25).
set -euo pipefail
cd "$(dirname "$0")/.."
tier="not slow"
case "${1:-}" in
  --slow) tier="slow"; shift ;;
  --all) tier=""; shift ;;
esac
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q ${tier:+-m "$tier"} "$@"
