#!/usr/bin/env bash
# Restore the raw results of earlier rounds (per-run JSON, logs, per-step metrics) from results/archive/ into the
# results/ folders that docs/results.md, docs/performance_history.md, docs/correctness.md and docs/gpu_runbook.md name
# (results/speedNN, results/levers*, results/mechanism*, results/protocol, results/gpu_report). They are packed one
# archive per experiment so that the repository's tracked files are the project, not its history.
set -euo pipefail
cd "$(dirname "$0")/.."
for archive in results/archive/*.tar.xz; do
  tar -xJf "$archive" -C results
  echo "unpacked $archive"
done
