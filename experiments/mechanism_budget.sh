#!/usr/bin/env bash
# The mechanism test with equal budgets and curves (docs/results.md, "Does the coprocessor compute?"): every arm
# trains with the compiled step for the same step count, saving a checkpoint every $EVERY steps, and exact match
# on held-out problems is measured at each checkpoint, so arms compare at equal traces seen.
# On the GPU machine (two GPUs), after `source scripts/gpu_env.sh`, three calls back to back:
#   bash experiments/mechanism_budget.sh round1 $OUT   # corpus; copro and pause at N_L=4 and 16 (two per GPU)
#   bash experiments/mechanism_budget.sh round2 $OUT   # copro and pause at N_L=64, LoRA decoder; eval of round 1
#   bash experiments/mechanism_budget.sh round3 $OUT   # eval of round 2; general-text ppl of the synth-trained arms
# Budgets: STEPS (default 1500) steps of batch 32 x 256 tokens, K=16 traces at the answer marker; MINUTES guards
# the call's 10-minute limit (an arm stopped by it still has its checkpoints at every multiple of EVERY).
set -uo pipefail
stage=$1; out=${2:-out}; R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
STEPS=${STEPS:-1500}; EVERY=${EVERY:-250}; MINUTES=${MINUTES:-6}; DOCS=${DOCS:-48000}; BATCH=${BATCH:-32}
COMPILE=${COMPILE:---compile-step graphs --keep-logits}
C="python3 -m cacheaug"
TR="--model gemma-3-270m --data $R/synth/train --seq-len 256 --n-ahead 16 --n-traces 16 --batch-size $BATCH \
--insertion marker --max-steps $STEPS --max-minutes $MINUTES --warmup-steps 100 --eval-every 0 --save-every $EVERY \
--keep-last 100 --log-every 10"
arm() { gpu=$1; name=$2; shift 2; CUDA_VISIBLE_DEVICES=$gpu $C train $TR $COMPILE "$@" --out-dir "$R/b_$name" \
  > "$R/b_$name.log" 2>&1; }
evaluate() {  # evaluate every checkpoint of the named arms on one GPU
  gpu=$1; tag=$2; shift 2
  ckpts=$(for a in "$@"; do ls -d "$R/b_$a"/step_*; done)
  CUDA_VISIBLE_DEVICES=$gpu $C eval synth --checkpoint $ckpts --heldout "$R/synth/heldout.jsonl" --check-generate 20 \
    --out "$out/synth_eval_$tag.json" > "$R/eval_$tag.log" 2>&1
  tail -n 60 "$R/eval_$tag.log" > "$out/eval_$tag.log"
}
metrics() {  # the training logs of the named arms, one JSON line per logged step
  python3 -c "import json, pathlib, sys; [print(json.dumps({'arm': a, **json.loads(l)})) for a in sys.argv[2:] \
for l in (pathlib.Path(sys.argv[1]) / f'b_{a}' / 'metrics.jsonl').read_text().splitlines()]" "$R" "$@"
}
case $stage in
round1)
  $C data synth --out "$R/synth" --train-docs "$DOCS" --heldout-per-level 100 > "$R/synth.log" 2>&1
  python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cpu')"  # convert once
  python3 -c "from cacheaug.base import load_gemma3_tokenizer as t; from cacheaug.data import build_token_files as b; \
print(b(t(), ['$R/synth/train'], 1.0))" > /dev/null 2>&1
  arm 0 copy-nl4 --n-latents 4 &
  arm 0 pause-nl4 --init pause --n-latents 4 &
  arm 1 copy-nl16 --n-latents 16 &
  arm 1 pause-nl16 --init pause --n-latents 16 &
  wait
  cp "$R/synth/meta.json" "$out/synth_meta.json"
  metrics copy-nl4 pause-nl4 copy-nl16 pause-nl16 > "$out/metrics_round1.jsonl"
  for a in copy-nl4 pause-nl4 copy-nl16 pause-nl16; do tr '\r' '\n' < "$R/b_$a.log" | grep -v "^train:" | tail -n 8; done \
    > "$out/train_round1.log" ;;
round2)
  arm 0 copy-nl64 --n-latents 64 &
  arm 0 pause-nl64 --init pause --n-latents 64 &
  arm 0 lora-decoder --init lora-decoder &
  evaluate 1 round1 copy-nl4 pause-nl4 copy-nl16 pause-nl16
  CUDA_VISIBLE_DEVICES=1 python3 scripts/check_equivalence.py --device cuda --backends sdpa --families gemma3 llama \
    --real gemma-3-270m --out "$out/equivalence_cuda.json" > "$R/equiv.log" 2>&1
  tail -n 30 "$R/equiv.log" > "$out/equivalence_cuda.log"
  wait
  metrics copy-nl64 pause-nl64 lora-decoder > "$out/metrics_round2.jsonl"
  for a in copy-nl64 pause-nl64 lora-decoder; do tr '\r' '\n' < "$R/b_$a.log" | grep -v "^train:" | tail -n 8; done \
    > "$out/train_round2.log" ;;
round3)
  evaluate 0 round2 copy-nl64 pause-nl64 lora-decoder &
  last() { ls -d "$R/b_$1"/step_* | tail -1; }
  CUDA_VISIBLE_DEVICES=1 $C eval ppl --checkpoint "$(last copy-nl4)" "$(last copy-nl16)" "$(last pause-nl16)" \
    --data default --sequences 16 --offsets 1 2 4 8 16 --out "$out/synth_general_ppl.json" > "$R/ppl.log" 2>&1
  tail -n 30 "$R/ppl.log" > "$out/general_ppl.log"
  wait ;;
*) echo "usage: $0 round1|round2|round3 OUT" >&2; exit 2 ;;
esac
