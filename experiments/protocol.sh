#!/usr/bin/env bash
# The fair protocol on the GPU (docs/results.md, "Deliberation on the adapted decoder"): adapt Gemma 3 270M on half
# of the default corpus (sotu held out as an unseen source), then train the coprocessor and the controls on the
# other half with the adapted decoder frozen, and evaluate in-source and unseen; plus the insertion-cost diagnostic.
# On the GPU machine (two GPUs), after `source scripts/gpu_env.sh`:
#   bash experiments/protocol.sh prep $OUT    # token files; insertion cost (GPU 1) beside the adaptation (GPU 0)
#   bash experiments/protocol.sh arms $OUT    # coprocessor, pause tokens, LoRA on the adapted decoder; eval ppl
set -uo pipefail
stage=$1; out=${2:-out}; R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
C="python3 -m cacheaug"
SPLIT="--data default --adapt-pct 50 --heldout-sources sotu"
last() { ls -d "$1"/step_* | tail -1; }
case $stage in
prep)
  python3 -c "from cacheaug.base import load_base_model; from cacheaug.data import Splits, build_token_files as b; \
m, t = load_base_model('gemma-3-270m', device='cpu'); print(b(t, ['default'], Splits(1.0, 50.0, ('sotu',))))"
  CUDA_VISIBLE_DEVICES=1 $C eval insertion-cost $SPLIT --out "$out/insertion_cost.json" > "$R/cost.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 $C adapt $SPLIT --max-steps 400 --batch-size 16 --out-dir "$R/adapted" > "$R/adapt.log" 2>&1
  wait
  cp "$R/adapted/adapt_metrics.jsonl" "$out/"
  tail -n 25 "$R/cost.log" "$R/adapt.log" > "$out/prep.log" ;;
arms)
  A="$R/adapted"
  COMMON="$SPLIT --model $A --n-latents 16 --batch-size 32 --max-steps 600 --max-minutes 6 --warmup-steps 60 \
--eval-every 0 --save-every 0"
  CUDA_VISIBLE_DEVICES=0 $C train $COMMON --init copy --compile-step graphs --keep-logits --out-dir "$R/copro" > "$R/copro.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C train $COMMON --init pause --compile-step graphs --keep-logits --out-dir "$R/pause" > "$R/pause.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C train $COMMON --init lora-decoder --out-dir "$R/lora" > "$R/lora.log" 2>&1 &
  wait
  for arm in copro pause lora; do cp "$R/$arm/metrics.jsonl" "$out/metrics_$arm.jsonl"; done
  $C eval ppl --model "$A" $SPLIT --checkpoint "$(last $R/copro)" "$(last $R/pause)" "$(last $R/lora)" --sequences 32 \
    --out "$out/ppl_adapted.json" > "$R/ppl.log" 2>&1
  tail -n 12 "$R/copro.log" "$R/pause.log" "$R/lora.log" "$R/ppl.log" > "$out/arms.log" ;;
esac
