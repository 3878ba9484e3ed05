#!/usr/bin/env bash
# The decisive run for the general-text gain (docs/results.md "The decisive run: its rule, fixed before the run").
#
# Setup, as the rule fixes it: the broad corpus (19 registry sources, 50.6M Gemma tokens; `sotu` kept out of every
# split: the unseen source), the decoder adapted with LoRA for one full pass of its split (30% of the training
# documents), then the best configuration so far (full copy, 16 latents, shared positions, echo start, reread) on
# that frozen decoder, K=128 insertion points at batch 16 (the fastest measured setup: trace kernel, rotary tables,
# compiled step; batch 24's 84 GiB does not fit an H100, batch 16 runs at 98% of its speed on an H200), a constant
# learning rate after warm-up (--min-lr-ratio 1), towards 4,883 steps = 1.0e7 traces (80M text tokens read over a
# 33M-token split: each token about 2.4 times); pause tokens trained identically. Evaluation:
# 128 in-source sequences (equal shares per source) and 128 unseen, offsets 1..32, paired bootstraps against the
# frozen decoder and between the arms, then the coprocessor re-scored in fp32.
#
# One session's 30 device minutes hold the adaptation and one arm, so the run spans two sessions; what the second
# needs comes back in $OUT (the LoRA adapters, 61 MB in 15 MiB pieces; the pause checkpoint, 40 kB):
#   session A, after the staging calls (docs/gpu_runbook.md, the broad corpus included):
#     source scripts/gpu_env.sh && bash experiments/decisive.sh adapt $OUT/a      # token files, the adapted decoder
#     bash experiments/decisive.sh arm pause $OUT/p     # again until the device time is spent (CALL_S per call)
#   session B, session A's $OUT/a/adapter.tar.* and $OUT/p/pause.tgz staged into ~/stage/decisive (two pieces per
#   call: run(carry=[".stage/dN"], command="mkdir -p ~/stage/decisive && cp .stage/dN/* ~/stage/decisive/")):
#     source scripts/gpu_env.sh && bash experiments/decisive.sh restore $OUT/r    # the same adapted decoder
#     bash experiments/decisive.sh arm copro $OUT/c     # again, to the pause arm's step count or further
#   or the arm as one process across calls (a detached process outlives its call; the machine stays while the next
#   call follows within 30 s): ARM_S=<seconds> bash experiments/decisive.sh bg copro; then in every call
#     bash experiments/decisive.sh wait $OUT/w          # until CALL_S or the arm's end; the last call: WAIT=end
#     bash experiments/decisive.sh eval $OUT/e          # the rule's evaluation, then the fp32 re-score
# When session A's adapters are not at hand (`.stage/` does not outlive a checkout), one session adapts again and runs
# the coprocessor, its compile started beside the adaptation (docs/gpu_runbook.md, "session C"):
#     source scripts/gpu_env.sh && bash experiments/decisive.sh warm copro $OUT/w0; bash experiments/decisive.sh adapt
#     /tmp/a; ARM_S=<seconds> bash experiments/decisive.sh bg copro; ... wait ...; EVAL_ARMS=copro ... eval $OUT/e
#   and the reports pair here with `cacheaug eval pair --rebase` (each arm against its own decoder's frozen loss).
# A second seed (rule (d)) only if (a)-(c) hold: SEED=1 ... arm copro, then eval.
# CPU dry run (tiny budget, no compile): DRY=1 bash experiments/decisive.sh adapt /tmp/d/a; ... arm pause ...; etc.
set -uo pipefail
stage=$1; shift; token_files() {  # the split's token files (built once, then read from the cache)
  python3 -c "from cacheaug.base import load_gemma3_tokenizer as t; from cacheaug.data import Splits, build_token_files \
as b; b(t(), ['broad'], Splits(1.0, 30.0, ('sotu',)))"
}
case $stage in arm|bg|warm|warmrun) name=$1; shift ;; esac; out=${1:-out}
R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
C="python3 -m cacheaug"; SEED=${SEED:-0}; DSTAGE=${DSTAGE:-$HOME/stage/decisive}
SPLIT="--data broad --heldout-pct 1 --adapt-pct 30 --heldout-sources sotu"
T0=$(date +%s); CALL_S=${CALL_S:-560}
if [ -n "${DRY:-}" ]; then  # the same commands at a size a CPU runs in minutes
  EVALE=2; STEPS=3; ABATCH=1; ALEN=64; K=4; B=2; T=128; SEQS=2; OFFS="1 2"; SPEED=""; MAXASTEPS=2
else
  STEPS=${STEPS:-4883}; ABATCH=16; ALEN=1024; K=128; B=${B:-16}; T=1024; SEQS=128; OFFS=$(seq 1 32)
  SPEED="--compile-step graphs --keep-logits --trace-kernel --rope-table"; MAXASTEPS=100000
fi
A="$R/adapted"
LOGE=${LOGE:-50}  # --log-every: also how often --max-minutes is checked
EVALE=${EVALE:-1000}  # --eval-every (32 in-source sequences): the offset-1 change against traces
minutes_left() { python3 -c "print(max(0.5, ($CALL_S - ($(date +%s) - $T0) - $1) / 60))"; }
last() { ls -d "$R/$(arm_dir "$1")"/step_* 2>/dev/null | tail -1; }  # an arm's (this SEED's) last checkpoint
arm_dir() { echo "d_$1$([ "$SEED" = 0 ] || echo "-s$SEED")"; }  # an arm's run directory under $R
arm_opts() {  # an arm's training options (copro | pause), but its decoder, length, schedule of saves and outputs
  echo "$SPLIT --init $([ "$1" = pause ] && echo pause || echo copy) --n-latents 16 --position-scheme shared" \
    "--echo-residual --reread-last --n-ahead 16 --n-traces $K --batch-size $B --seq-len $T --lr 1e-4" \
    "--warmup-steps 100 --min-lr-ratio 1 --seed $SEED $SPEED"
}
case $stage in
adapt)  # token files of the split, then LoRA r=64 for one full pass over the adapt split (batch 16 x 1024)
  steps=$(python3 -c "
import json, math
from cacheaug.base import load_gemma3_tokenizer
from cacheaug.data import Splits, build_token_files
d = build_token_files(load_gemma3_tokenizer(), ['broad'], Splits(1.0, 30.0, ('sotu',)))
meta = json.loads((d / 'meta.json').read_text())
print(json.dumps(meta), file=open('$R/token_meta.json', 'w'))
print(min($MAXASTEPS, math.ceil(meta['adapt_tokens'] / ($ABATCH * $ALEN))))")
  echo "decisive: adapting for $steps steps (one pass over the adapt split)" | tee "$out/adapt.log"
  $C adapt $SPLIT --batch-size $ABATCH --seq-len $ALEN --max-steps "$steps" --warmup-steps 50 --save-every 0 \
    --out-dir "$A" >> "$R/adapt.log" 2>&1
  tr '\r' '\n' < "$R/adapt.log" | grep -v "^adapt" | tail -n 15 >> "$out/adapt.log"
  { cat "$R/token_meta.json"; md5sum "$A/model.safetensors"; } >> "$out/adapt.log"  # (a call returns 8 files)
  tar cf - -C "$A" adapter | split -b 15m -d - "$out/adapter.tar." ;;
warm)  # the arm's compile (about 4 minutes for the coprocessor) beside the adaptation: the token files and the GGUF
  # conversion first (both processes need them), then one step of the arm on the base decoder (the same shapes) in
  # the background, stopped once its compile artifacts are saved to $R/cc_<arm>.bin; `arm` waits for it and hot-loads
  # them (a cache miss, or a warm-up out of GPU memory, only means the arm compiles as before)
  { token_files; python3 -c "from cacheaug.base import load_base_model as m; m('gemma-3-270m')"; } > "$R/warm_prep.log" 2>&1
  rm -f "$R/cc_$name.bin"; touch "$R/warm.running"
  setsid nohup bash "$0" warmrun "$name" "$out" > "$R/warm.out" 2>&1 < /dev/null &
  echo "decisive: the $name arm's compile started beside" ;;
warmrun)  # (`warm`'s background part)
  $C train $(arm_opts "$name") --model gemma-3-270m --max-steps 10 --log-every 1 --eval-every 0 \
    --compile-cache "$R/cc_$name.bin" --out-dir "$R/warm" > "$R/warm.log" 2>&1 &
  p=$!; echo $p > "$R/warm.pid"
  while kill -0 $p 2>/dev/null && [ ! -f "$R/cc_$name.bin" ]; do sleep 1; done
  kill -KILL $p 2>/dev/null; wait $p 2>/dev/null; rm -rf "$R/warm" "$R/warm.running"  # (no checkpoint: not needed)
  tr '\r' '\n' < "$R/warm.log" | grep "first step" | tee "$out/warm.log" ;;
restore)  # the adapted decoder of session A from its adapters (staged into $DSTAGE, two pieces per call)
  cat "$DSTAGE"/adapter.tar.* | tar xf - -C "$R"
  python3 - "$R/adapter" "$A" <<'EOF'
import sys

from peft import PeftModel

from cacheaug.base import load_base_model

base, tokenizer = load_base_model("gemma-3-270m", for_training=True)  # as `cacheaug adapt` loads it
merged = PeftModel.from_pretrained(base, sys.argv[1]).merge_and_unload()
dtype = merged.get_input_embeddings().weight.dtype
for p in merged.parameters():
    p.data = p.data.to(dtype)
merged.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
EOF
  md5sum "$A/model.safetensors" > "$out/adapted.md5"
  if [ -f "$DSTAGE/pause.tgz" ]; then tar xzf "$DSTAGE/pause.tgz" -C "$R"; fi
  token_files > /dev/null 2>&1 ;;
arm)  # one arm (copro | pause) towards STEPS; the same command resumes it (schedule and data order follow the step).
  # SIGTERM before the call's end, should the budget not be reached: the trainer saves a checkpoint on it.
  # KEEP=N (the other arm's final step): checkpoints every N steps instead of 500, and step N kept apart afterwards as
  # d_<arm>_at_N for the comparison at equal traces (one process: no restart, no second compile)
  dir=$(arm_dir "$name"); keep=${KEEP:-0}
  for _ in $(seq 150); do [ -f "$R/warm.running" ] || break; sleep 2; done  # `warm`'s compile artifacts first
  if [ -f "$R/warm.running" ]; then kill -KILL "$(cat "$R/warm.pid")" 2>/dev/null; sleep 5; fi  # not two on one GPU
  timeout -s TERM $((CALL_S - ($(date +%s) - T0) - 20)) $C train $(arm_opts "$name") --model "$A" --max-steps "$STEPS" \
    --max-minutes "$(minutes_left 60)" --save-every "$([ "$keep" -gt 0 ] && echo "$keep" || echo 500)" --keep-last 3 \
    --eval-every $EVALE --log-every $LOGE --compile-cache "$R/cc_$name.bin" --out-dir "$R/$dir" >> "$R/$dir.log" 2>&1
  step="$R/$dir/step_$(printf %06d "$keep")"
  if [ "$keep" -gt 0 ] && [ -d "$step" ]; then
    mkdir -p "$R/${dir}_at_$keep" && cp -r "$step" "$R/${dir}_at_$keep/"
    echo "decisive: step $keep kept apart as $R/${dir}_at_$keep" >> "$R/$dir.log"
  fi
  tr '\r' '\n' < "$R/$dir.log" | grep -v "^train" | tail -n 8 > "$out/train_$dir.log"
  cp "$R/$dir/metrics.jsonl" "$out/metrics_$dir.jsonl" 2>/dev/null
  cc="$R/cc_$name.bin"  # the compile artifacts (a later session stages them there: seconds to the first step)
  if [ -f "$cc" ] && [ "$(stat -c %s "$cc")" -lt 15728640 ]; then cp "$cc" "$out/"; fi
  if [ "$name" = pause ]; then tar czf "$out/pause.tgz" -C "$R" "$dir"; fi ;;
bg)  # the arm towards STEPS as one detached process for ARM_S seconds (step 2,300, the pause arm's last, saved and
  # kept apart: KEEP); its outputs land in $R/bg
  rm -rf "$R/bg"; mkdir -p "$R/bg"; echo "$name" > "$R/bg/name"
  KEEP=${KEEP:-2300} CALL_S=$ARM_S setsid nohup bash -c 'bash "$0" arm "$1" "$2"; touch "$2/ended"' "$0" "$name" \
    "$R/bg" > "$R/bg/arm.out" 2>&1 < /dev/null &
  echo "decisive: the $name arm started in the background for $ARM_S s" ;;
wait)  # report the background arm until CALL_S has passed or it has ended (WAIT=end: until it ends); its outputs then
  dir=$R/$(arm_dir "$(cat "$R/bg/name")")
  while [ ! -f "$R/bg/ended" ]; do
    [ "${WAIT:-}" != end ] && [ $(( $(date +%s) - T0 )) -ge $((CALL_S - 15)) ] && break
    sleep 5
  done
  tr '\r' '\n' < "$dir.log" 2>/dev/null | grep -v "^train" | tail -n 4  # (no log yet while the arm loads)
  if [ -f "$R/bg/ended" ]; then echo "decisive: the arm has ended"; cp "$R"/bg/* "$out/"; fi ;;
eval)  # the rule's evaluation at the final checkpoints, then the coprocessor re-scored in fp32
  # EVAL_ARMS=pause (or copro): that arm alone, paired later with the other's report by `cacheaug eval pair`
  ckpts=""; arms=" ${EVAL_ARMS:-copro pause} "
  [[ $arms == *" copro "* ]] && ckpts="$(last copro) $(ls -d "$R/$(arm_dir copro)"_at_*/step_* 2>/dev/null | tail -1)"  # + equal traces
  [[ $arms == *" pause "* ]] && ckpts="$ckpts $(last pause)"
  $C eval ppl --model "$A" $SPLIT --checkpoint $ckpts --balanced --sequences $SEQS --offsets $OFFS --bootstrap 2000 \
    --out "$out/ppl.json" > "$R/ppl.log" 2>&1
  tr '\r' '\n' < "$R/ppl.log" | grep -v "^eval" | tail -n 90 > "$out/ppl.log"
  [ -n "$(last copro)" ] && [[ $arms == *" copro "* ]] || exit 0
  $C eval ppl --model "$A" $SPLIT --checkpoint "$(last copro)" --balanced --sequences $SEQS --offsets 1 2 4 8 16 32 \
    --bootstrap 2000 --dtype float32 --out "$out/ppl_fp32.json" > "$R/ppl_fp32.log" 2>&1
  tr '\r' '\n' < "$R/ppl_fp32.log" | grep -v "^eval" | tail -n 30 > "$out/ppl_fp32.log" ;;
*) echo "usage: $0 adapt|warm copro|restore|arm copro|arm pause|bg copro|wait|eval OUT" >&2; exit 2 ;;
esac
