#!/usr/bin/env bash
# The levers of issue "find the deliberation gain" on the adapted frozen decoder (docs/results.md, "Deliberation on
# the adapted decoder"): the fair protocol's split (adapt on half of the default corpus, sotu held out as an unseen
# source), then the insertion-cost diagnostic under every position scheme, with and without token p read again,
# and short training runs of lever combinations, each evaluated in-source and unseen.
# On the GPU machine (two GPUs), after `source scripts/gpu_env.sh`, calls back to back (the adapted decoder and the
# checkpoints stay in $RUNS on the warm machine):
#   bash experiments/levers.sh prep $OUT    # token files; adapt (GPU 0) beside the bf16 equivalence check of the
#                                           # levers (GPU 1); then the diagnostic on the adapted decoder (both GPUs)
#   bash experiments/levers.sh arms1 $OUT   # four lever combinations at N_L=16 (two per GPU); eval ppl
#   bash experiments/levers.sh arms2 $OUT   # the best of arms1 (by in-source offset 1) for LONG steps with a
#                                           # checkpoint every LONG/5; as pause tokens; the paper default; eval ppl
#   bash experiments/levers.sh arms3 $OUT   # the best of arms1 at N_L=4, and with a pre-norm read-out; eval ppl
# The long runs (second GPU session): shared + echo + reread and pause tokens with the same levers, one per GPU, for
# LONGSTEPS steps over three consecutive calls (each resumes from the newest checkpoint; a checkpoint every 1,000):
#   bash experiments/levers.sh long1 $OUT   # token files; adapt (GPU 0) beside the bf16 equivalence of the default
#                                           # scheme (GPU 1); both long arms until the call's time is spent
#   bash experiments/levers.sh long2 $OUT   # both arms continue; the earlier checkpoints are evaluated meanwhile
#   bash experiments/levers.sh long3 $OUT   # both continue, leaving time to evaluate every remaining checkpoint
# Each call is sized to CALL_S seconds (default 570) from its start. The copro arm saves its compile artifacts
# (--compile-cache) in long1 and loads them into empty inductor / Triton caches in long2 (what a fresh machine
# would see); the first step's time is in metrics.jsonl (first_step_s).
# The third GPU session: is the unseen-source loss of the long run repetition (197M tokens = 22 passes over the
# coprocessor's 8.9M-token half of the corpus) or traces? Same levers, three arms over three calls (resume as above):
#   reg-k128   the coprocessor at K=128 traces per sequence (the paper's K), batch 8: 2.6M traces (the long run's 5,000 steps)
#              in 2,500 steps, from 20.5M tokens (2.3 passes) instead of 164M            (GPU 0)
#   reg-lora   a rank-16 LoRA coprocessor (lr 3e-4) at K=16, batch 32, 3,000 steps (11 passes): fewer trainable
#              weights against the same repetition                                  (GPU 1)
#   reg-pause  pause tokens at K=128, batch 8, 1,500 steps (the control; flat in the long run)   (GPU 1)
#   bash experiments/levers.sh reg1 $OUT    # token files; adapt (GPU 0) beside the bf16 equivalence of the levers
#                                           # for the copy, lora and pause arms (GPU 1); the three arms
#   bash experiments/levers.sh reg2 $OUT    # the arms continue; earlier checkpoints evaluated meanwhile
#   bash experiments/levers.sh reg3 $OUT    # the arms continue, leaving time to evaluate every remaining checkpoint
# Budget per arm: STEPS (default 600) steps of batch 32 x 1024 tokens, K=16 (19.7M text tokens, as the protocol run).
set -uo pipefail
stage=$1; out=${2:-out}; R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
STEPS=${STEPS:-600}; MINUTES=${MINUTES:-5.5}; LONG=${LONG:-1500}; LONG_MINUTES=${LONG_MINUTES:-6.5}
C="python3 -m cacheaug"
SPLIT="--data default --adapt-pct 50 --heldout-sources sotu"
A="$R/adapted"
TR="$SPLIT --model $A --batch-size 32 --max-steps $STEPS --max-minutes $MINUTES --warmup-steps 60 --eval-every 0 \
--save-every 0 --compile-step graphs --keep-logits"
arm() { gpu=$1; name=$2; shift 2; CUDA_VISIBLE_DEVICES=$gpu $C train $TR "$@" --out-dir "$R/l_$name" \
  > "$R/l_$name.log" 2>&1; }
last() { ls -d "$R/l_$1"/step_* | tail -1; }
evaluate() {  # eval ppl of the named arms (in-source held-out and unseen) on one GPU
  gpu=$1; tag=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu $C eval ppl --model "$A" $SPLIT --checkpoint $(for a in "$@"; do last "$a"; done) \
    --sequences 32 --out "$out/ppl_$tag.json" > "$R/ppl_$tag.log" 2>&1
  tail -n 20 "$R/ppl_$tag.log" > "$out/ppl_$tag.log"
  cp "$out/ppl_$tag.json" "$R/"  # later calls pick the best from it ($OUT is fresh each call)
}
metrics() {  # the training logs of the named arms, one JSON line per logged step
  python3 -c "import json, pathlib, sys; [print(json.dumps({'arm': a, **json.loads(l)})) for a in sys.argv[2:] \
for l in (pathlib.Path(sys.argv[1]) / f'l_{a}' / 'metrics.jsonl').read_text().splitlines()]" "$R" "$@"
}
T0=$(date +%s); CALL_S=${CALL_S:-570}; LONGSTEPS=${LONGSTEPS:-6000}
LEVERS="--n-latents 16 --position-scheme shared --echo-residual --reread-last"
long_arms() {  # $1: seconds to leave at the end of the call; both long arms until then, one per GPU
  m=$(python3 -c "print(max(0.5, ($CALL_S - ($(date +%s) - $T0) - $1) / 60))")
  L="$SPLIT --model $A --batch-size 32 --max-steps $LONGSTEPS --max-minutes $m --warmup-steps 60 --eval-every 0 \
--save-every 1000 --keep-last 20 --compile-step graphs --keep-logits $LEVERS"
  echo "long arms: --max-minutes $m" | tee -a "$R/long.log"
  env CUDA_VISIBLE_DEVICES=0 ${COPRO_ENV:-} $C train $L --compile-cache "$R/cc_copro.bin" --out-dir "$R/l_long-copro" \
    >> "$R/l_long-copro.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C train $L --init pause --compile-cache "$R/cc_pause.bin" --out-dir "$R/l_long-pause" \
    >> "$R/l_long-pause.log" 2>&1 &
}
eval_new() {  # $1 GPU, $2 arm, $3 tag: eval ppl of the arm's checkpoints not evaluated yet
  new=$(for c in "$R/l_$2"/step_*; do [ -d "$c" ] && ! grep -qx "$c" "$R/evaluated" 2>/dev/null && echo "$c"; done)
  [ -n "$new" ] || return 0
  echo "$new" >> "$R/evaluated"
  CUDA_VISIBLE_DEVICES=$1 $C eval ppl --model "$A" $SPLIT --checkpoint $new --sequences 32 \
    --out "$out/ppl_$2_$3.json" > "$R/ppl_$2_$3.log" 2>&1
  { echo "== $2 $3"; tail -n 12 "$R/ppl_$2_$3.log"; } >> "$out/eval.log"
}
long_report() {  # $1 stage: the arms' metrics and log tails
  metrics long-copro long-pause > "$out/metrics_$1.jsonl"
  for a in long-copro long-pause; do echo "== $a"; tr '\r' '\n' < "$R/l_$a.log" | grep -v "^train:" | tail -n 12
  done > "$out/train_$1.log"
}
REG_ARMS="reg-k128 reg-lora reg-pause"
reg_arms() {  # $1: seconds to leave at the end of the call; the three arms of the third session until then
  m=$(python3 -c "print(max(0.5, ($CALL_S - ($(date +%s) - $T0) - $1) / 60))")
  L="$SPLIT --model $A --max-minutes $m --warmup-steps 60 --eval-every 0 --keep-last 20 --compile-step graphs \
--keep-logits $LEVERS"
  echo "reg arms: --max-minutes $m" | tee -a "$R/reg.log"
  CUDA_VISIBLE_DEVICES=0 $C train $L --n-traces 128 --batch-size 8 --max-steps 2500 --save-every 500 \
    --compile-cache "$R/cc_k128.bin" --out-dir "$R/l_reg-k128" >> "$R/l_reg-k128.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C train $L --init lora --lora-rank 16 --lr 3e-4 --batch-size 32 --max-steps 3000 \
    --save-every 1000 --compile-cache "$R/cc_lora.bin" --out-dir "$R/l_reg-lora" >> "$R/l_reg-lora.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C train $L --init pause --n-traces 128 --batch-size 8 --max-steps 1500 --save-every 500 \
    --compile-cache "$R/cc_pause128.bin" --out-dir "$R/l_reg-pause" >> "$R/l_reg-pause.log" 2>&1 &
}
reg_report() {  # $1 stage
  metrics $REG_ARMS > "$out/metrics_$1.jsonl"
  for a in $REG_ARMS; do echo "== $a"; tr '\r' '\n' < "$R/l_$a.log" | grep -v "^train:" | tail -n 12
  done > "$out/train_$1.log"
  nvidia-smi --query-gpu=index,memory.used --format=csv >> "$out/train_$1.log" 2>&1
}
COST="eval insertion-cost $SPLIT --model $A --latents 1 4 16 --position-schemes shifted shared overlap --reread off on"
case $stage in
long1)
  python3 -c "from cacheaug.base import load_base_model; from cacheaug.data import Splits, build_token_files as b; \
m, t = load_base_model('gemma-3-270m', device='cpu'); print(b(t, ['default'], Splits(1.0, 50.0, ('sotu',))))"
  CUDA_VISIBLE_DEVICES=1 python3 scripts/check_equivalence.py --device cuda --backends sdpa --families gemma3 llama \
    --real gemma-3-270m --out "$out/equivalence_cuda.json" > "$R/equiv.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 $C adapt $SPLIT --max-steps 400 --batch-size 16 --out-dir "$A" > "$R/adapt.log" 2>&1
  wait
  cp "$A/adapt_metrics.jsonl" "$out/"
  tail -n 20 "$R/adapt.log" "$R/equiv.log" | tr '\r' '\n' | grep -v "it/s\]$" > "$out/prep_long1.log"
  long_arms 45; wait
  size=$(stat -c %s "$R/cc_copro.bin" 2>/dev/null || echo 0)
  [ "$size" -lt 15000000 ] && [ "$size" -gt 0 ] && cp "$R/cc_copro.bin" "$out/"
  long_report long1 ;;
long2|long3)
  mkdir -p "$R/fresh_inductor" "$R/fresh_triton"
  [ "$stage" = long2 ] && COPRO_ENV="TORCHINDUCTOR_CACHE_DIR=$R/fresh_inductor TRITON_CACHE_DIR=$R/fresh_triton"
  if [ "$stage" = long2 ]; then long_arms 45; else long_arms 150; fi
  eval_new 0 long-copro "${stage}a" &   # the previous call's checkpoints, while the step compiles (CPU-bound)
  eval_new 1 long-pause "${stage}a" &
  wait
  if [ "$stage" = long3 ]; then
    eval_new 0 long-copro "${stage}b" &
    eval_new 1 long-pause "${stage}b" &
    wait
  fi
  long_report "$stage" ;;
reg1)
  python3 -c "from cacheaug.base import load_base_model; from cacheaug.data import Splits, build_token_files as b; \
m, t = load_base_model('gemma-3-270m', device='cpu'); print(b(t, ['default'], Splits(1.0, 50.0, ('sotu',))))"
  CUDA_VISIBLE_DEVICES=1 python3 scripts/check_equivalence.py --device cuda --backends sdpa --families gemma3 llama \
    --real gemma-3-270m --inits copy lora pause --levers position_scheme=shared,reread_last=1,echo_residual=1 \
    --out "$out/equivalence_cuda.json" > "$R/equiv.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 $C adapt $SPLIT --max-steps 400 --batch-size 16 --out-dir "$A" > "$R/adapt.log" 2>&1
  wait
  cp "$A/adapt_metrics.jsonl" "$out/"
  tail -n 20 "$R/adapt.log" "$R/equiv.log" | tr '\r' '\n' | grep -v "it/s\]$" > "$out/prep_reg1.log"
  reg_arms 40; wait
  reg_report reg1 ;;
reg2|reg3)
  if [ "$stage" = reg2 ]; then reg_arms 40; else reg_arms 170; fi
  eval_new 0 reg-k128 "${stage}a" &   # the previous call's checkpoints, while the steps compile or load
  { eval_new 1 reg-lora "${stage}a"; eval_new 1 reg-pause "${stage}a"; } &
  wait
  if [ "$stage" = reg3 ]; then
    eval_new 0 reg-k128 "${stage}b" &
    { eval_new 1 reg-lora "${stage}b"; eval_new 1 reg-pause "${stage}b"; } &
    wait
  fi
  reg_report "$stage" ;;
prep)
  python3 -c "from cacheaug.base import load_base_model; from cacheaug.data import Splits, build_token_files as b; \
m, t = load_base_model('gemma-3-270m', device='cpu'); print(b(t, ['default'], Splits(1.0, 50.0, ('sotu',))))"
  CUDA_VISIBLE_DEVICES=1 python3 scripts/check_equivalence.py --device cuda --backends sdpa --families gemma3 llama \
    --real gemma-3-270m --levers position_scheme=shared,reread_last=1,echo_residual=1 \
    --out "$out/equivalence_levers_cuda.json" > "$R/equiv.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=0 $C adapt $SPLIT --max-steps 400 --batch-size 16 --out-dir "$A" > "$R/adapt.log" 2>&1
  wait
  cp "$A/adapt_metrics.jsonl" "$out/"
  CUDA_VISIBLE_DEVICES=0 $C $COST --kinds echo pause --out "$out/cost_echo_pause.json" > "$R/cost0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $C $COST --kinds coprocessor --out "$out/cost_copro.json" > "$R/cost1.log" 2>&1
  wait
  tail -n 30 "$R/adapt.log" "$R/cost0.log" "$R/cost1.log" "$R/equiv.log" | tr '\r' '\n' | grep -v "it/s\]$" \
    > "$out/prep.log" ;;
arms1)
  arm 0 echo --n-latents 16 --echo-residual &
  arm 0 shared-echo --n-latents 16 --position-scheme shared --echo-residual &
  arm 1 shared-echo-reread --n-latents 16 --position-scheme shared --echo-residual --reread-last &
  arm 1 reread --n-latents 16 --reread-last &
  wait
  evaluate 0 arms1a echo shared-echo &
  evaluate 1 arms1b shared-echo-reread reread
  wait
  metrics echo shared-echo shared-echo-reread reread > "$out/metrics_arms1.jsonl"
  for a in echo shared-echo shared-echo-reread reread; do tr '\r' '\n' < "$R/l_$a.log" | grep -v "^train:" | tail -n 6
  done > "$out/train_arms1.log" ;;
arms2|arms3)
  # the best combination of arms1 by in-source offset-1 change; its flags
  best=$(python3 - "$R" <<'EOF'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1]); scores = {}
for tag in ("arms1a", "arms1b"):
    for ckpt, run in json.loads((runs / f"ppl_{tag}.json").read_text())["heldout"].items():
        scores[pathlib.Path(ckpt).parent.name[2:]] = run["change"][0]
print(min(scores, key=scores.get))
EOF
)
  case $best in
    echo) F="--echo-residual" ;; shared-echo) F="--position-scheme shared --echo-residual" ;;
    shared-echo-reread) F="--position-scheme shared --echo-residual --reread-last" ;; reread) F="--reread-last" ;;
  esac
  echo "best of arms1: $best ($F)" | tee "$out/best_arms1.txt"
  if [ "$stage" = arms2 ]; then
    # the best for LONG steps, a checkpoint every LONG/5 (the traces curve); pause tokens with the same levers and the
    # paper-default coprocessor at STEPS
    arm 0 best-long --n-latents 16 $F --max-steps "$LONG" --save-every $((LONG / 5)) --keep-last 10 \
      --max-minutes "$LONG_MINUTES" &
    arm 1 best-pause --n-latents 16 --init pause $F &
    arm 1 paper --n-latents 16 &
    wait
    CUDA_VISIBLE_DEVICES=0 $C eval ppl --model "$A" $SPLIT --checkpoint "$R"/l_best-long/step_* --sequences 32 \
      --out "$out/ppl_arms2_long.json" > "$R/ppl_arms2_long.log" 2>&1 &
    evaluate 1 arms2 best-pause paper
    wait
    tail -n 20 "$R/ppl_arms2_long.log" > "$out/ppl_arms2_long.log"
    arms="best-long best-pause paper"
  else
    arm 0 best-nl4 --n-latents 4 $F &
    arm 1 best-prenorm --n-latents 16 $F --readout pre_norm &
    wait
    evaluate 0 arms3 best-nl4 best-prenorm
    arms="best-nl4 best-prenorm"
  fi
  metrics $arms > "$out/metrics_$stage.jsonl"
  for a in $arms; do tr '\r' '\n' < "$R/l_$a.log" | grep -v "^train:" | tail -n 6; done > "$out/train_$stage.log" ;;
esac
