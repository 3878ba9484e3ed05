#!/usr/bin/env bash
# Skills without regressions (docs/results.md): the mechanism test on the strict split (no held-out problem has an
# answer-equivalent twin in training), answers supervised to their end (--n-ahead 32 covers the longest answer,
# a sorted list of 7 numbers), and the levers at an equal budget beside pause tokens and a LoRA decoder.
# On the one-GPU machine, after `source scripts/gpu_env.sh`, four calls back to back (results under $OUT):
#   bash experiments/skills.sh prep $OUT  # corpora (synthetic; synthetic + general text), token files
#   bash experiments/skills.sh a $OUT   # copro, pause, LoRA decoder, copro at 3x the learning rate: four compiled
#                                       # arms on one GPU
#   bash experiments/skills.sh b $OUT   # copro N_L=64 and copro on the mixed corpus; eval synth of round a
#   bash experiments/skills.sh c $OUT   # eval synth of round b; general-text perplexity of the copro arms
# Budget: STEPS (1500) steps of batch 32 x 256 tokens, K=16 insertion points at the answer marker; MINUTES guards the
# call's limit (an arm stopped by it still leaves its last checkpoint, and the report says how many steps it ran).
# A CPU dry run: STEPS=2 DOCS=40 BATCH=2 COMPILE= SEQS=1 MINUTES=2 bash experiments/skills.sh prep /tmp/sk (then a, b, c)
#
# Second round (the gate): three calls back to back after the staging calls,
#   source scripts/gpu_env.sh && MINUTES=6 bash experiments/skills.sh r2a $OUT/a  # corpora; copy N_L=32 at lr 3e-4
#                                             # and a LoRA-rank coprocessor (r=32, lr 1e-3, the size that can ship)
#   MINUTES=2.5 bash experiments/skills.sh r2b $OUT/b   # both resumed to 1,500 steps (round 1's budget), then
#   (R2="lora32 copy-answer" on all three picks the arms, see r2arm: copy-answer is copy N_L=16 lr 3e-4 trained with
#   --insertion answer, K=32, evaluated also with --deliberate every: the coprocessor before every answer token)
#   bash experiments/skills.sh r2c $OUT/c   # gates fitted on problems + general text (State of the Union left out
#                                           # of everything: the unseen source), eval synth always-on and gated,
#                                           # general-text perplexity in-source and unseen, the LoRA arm exported
# CPU dry run: STEPS=2 DOCS=40 BATCH=2 COMPILE= SEQS=1 MINUTES=2 GATE_SEQS=8 bash experiments/skills.sh r2a /tmp/sk
set -uo pipefail
stage=$1; out=${2:-out}; R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
STEPS=${STEPS:-1500}; MINUTES=${MINUTES:-8}; DOCS=${DOCS:-48000}; BATCH=${BATCH:-32}; AHEAD=${AHEAD:-32}
C="python3 -m cacheaug"
R2=${R2:-copy-nl32-lr3 lora32}  # the second round's arms (r2arm below names them)
TR="--model gemma-3-270m --seq-len 256 --n-ahead $AHEAD --n-traces 16 --batch-size $BATCH --insertion marker \
--max-steps $STEPS --max-minutes $MINUTES --warmup-steps 100 --eval-every 0 --save-every 500 --keep-last 4 \
--log-every 10 ${COMPILE---compile-step graphs --keep-logits}"
arm() {  # the same command resumes an arm stopped by --max-minutes (compile artifacts kept: it restarts in seconds)
  name=$1; data=$2; shift 2; echo "$data $*" > "$R/s_$name.args"
  $C train $TR --data "$R/$data/train" "$@" --compile-cache "$R/cc_$name" --out-dir "$R/s_$name" >> "$R/s_$name.log" 2>&1
}
finish() {  # resume, side by side, every named arm whose last checkpoint is short of STEPS
  for a in "$@"; do
    last=$(ls -d "$R/s_$a"/step_* 2>/dev/null | tail -1); last=${last##*step_}
    [ "$((10#${last:-0}))" -lt "$STEPS" ] && { read -r data args < "$R/s_$a.args"; arm "$a" "$data" $args & }
  done
  wait
}
evaluate() {  # the last checkpoint of each named arm, on the strict held-out file
  tag=$1; shift
  ckpts=$(for a in "$@"; do ls -d "$R/s_$a"/step_* | tail -1; done)
  $C eval synth --checkpoint $ckpts --heldout "$R/synth/heldout.jsonl" --check-generate ${CHECK:-40} \
    --out "$out/synth_eval_$tag.json" > "$R/eval_$tag.log" 2>&1
  tr '\r' '\n' < "$R/eval_$tag.log" | grep -v "^eval synth" | tail -n 40 > "$out/eval_$tag.log"
}
r2arm() {  # one arm of the second round, by name
  case $1 in
  copy-nl32-lr3) arm $1 synth --n-latents 32 --lr 3e-4 ;;
  lora32) arm $1 synth --init lora --lora-rank 32 --n-latents 16 --lr 1e-3 ;;
  copy-answer) arm $1 synth --n-latents 16 --lr 3e-4 --insertion answer --n-traces 32 ;;
  lora32-answer) arm $1 synth --init lora --lora-rank 32 --n-latents 16 --lr 1e-3 --insertion answer --n-traces 32 ;;
  *) echo "skills: no second-round arm named $1" >&2; return 2 ;;
  esac
}
summary() {  # per arm: steps run, last logged loss, traces/s (the metrics files stay on the machine)
  for a in "$@"; do
    python3 -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; r = [x for x in rows if 'loss' in x][-1]; \
print(json.dumps({'arm': sys.argv[2], 'step': r.get('step'), 'loss': r.get('loss'), 'traces_per_s': r.get('traces_per_s')}))" \
      "$R/s_$a/metrics.jsonl" "$a"
  done
}
case $stage in
prep)
  $C data synth --out "$R/synth" --train-docs "$DOCS" --heldout-per-level 100 > "$R/synth.log" 2>&1
  $C data synth --out "$R/synthmix" --train-docs "$DOCS" --heldout-per-level 100 --mix-sources default \
    --mix-ratio 0.5 > "$R/synthmix.log" 2>&1
  cmp -s "$R/synth/heldout.jsonl" "$R/synthmix/heldout.jsonl" || echo "skills: the two corpora's held-out files differ" >&2
  cp "$R/synth/meta.json" "$out/synth_meta.json"; cp "$R/synthmix/meta.json" "$out/synthmix_meta.json"
  python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cpu')"  # convert once
  python3 -c "from cacheaug.base import load_gemma3_tokenizer as t; from cacheaug.data import build_token_files as b; \
[b(t(), [f'$R/{d}/train'], 1.0) for d in ('synth', 'synthmix')]" > /dev/null 2>&1 ;;
a)
  arm copy-nl16 synth --n-latents 16 &
  arm pause-nl16 synth --init pause --n-latents 16 &
  arm lora-decoder synth --init lora-decoder &
  arm copy-nl16-lr3 synth --n-latents 16 --lr 3e-4 &
  wait
  summary copy-nl16 pause-nl16 lora-decoder copy-nl16-lr3 > "$out/train_a.jsonl"
  for a in copy-nl16 pause-nl16 lora-decoder copy-nl16-lr3; do tr '\r' '\n' < "$R/s_$a.log" | grep -v "^train" | tail -n 5; done \
    > "$out/train_a.log" ;;
b)
  arm copy-nl64 synth --n-latents 64 &
  arm copy-nl16-mix synthmix --n-latents 16 &
  { finish copy-nl16 pause-nl16 lora-decoder copy-nl16-lr3; evaluate a copy-nl16 pause-nl16 lora-decoder copy-nl16-lr3; } &
  wait
  summary copy-nl16 pause-nl16 lora-decoder copy-nl16-lr3 copy-nl64 copy-nl16-mix > "$out/train_b.jsonl"
  for a in copy-nl64 copy-nl16-mix; do tr '\r' '\n' < "$R/s_$a.log" | grep -v "^train" | tail -n 5; done > "$out/train_b.log" ;;
c)
  finish copy-nl64 copy-nl16-mix
  evaluate b copy-nl64 copy-nl16-mix &
  last() { ls -d "$R/s_$1"/step_* | tail -1; }
  $C eval ppl --checkpoint "$(last copy-nl16)" "$(last copy-nl16-mix)" "$(last pause-nl16)" --data default \
    --sequences ${SEQS:-32} --offsets 1 2 4 8 16 32 --out "$out/general_ppl.json" > "$R/ppl.log" 2>&1
  tr '\r' '\n' < "$R/ppl.log" | tail -n 30 > "$out/general_ppl.log"
  wait ;;
r2a)
  $C data synth --out "$R/synth" --train-docs "$DOCS" --heldout-per-level 100 > "$R/synth.log" 2>&1
  $C data synth --out "$R/synthmix2" --train-docs "$DOCS" --heldout-per-level 100 --mix-ratio 0.5 --mix-sources \
    default:pydoc default:gcide default:nlp default:moby default:jargon default:debref > "$R/synthmix2.log" 2>&1
  cp "$R/synth/meta.json" "$out/synth_meta.json"; cp "$R/synthmix2/meta.json" "$out/synthmix2_meta.json"
  md5sum "$R/synth/heldout.jsonl" > "$out/heldout.md5"
  python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cpu')"  # convert once
  python3 -c "from cacheaug.base import load_gemma3_tokenizer as t; from cacheaug.data import build_token_files as b; \
b(t(), ['$R/synth/train'], 1.0)" > /dev/null 2>&1
  for a in $R2; do r2arm $a & done
  wait
  summary $R2 > "$out/train_r2a.jsonl"
  for a in $R2; do tr '\r' '\n' < "$R/s_$a.log" | grep -v "^train" | tail -n 5; done > "$out/train_r2a.log" ;;
r2b)
  finish $R2
  summary $R2 > "$out/train_r2b.jsonl"
  for a in $R2; do tr '\r' '\n' < "$R/s_$a.log" | grep -v "^train" | tail -n 5; done > "$out/train_r2b.log" ;;
r2c)
  last() { ls -d "$R/s_$1"/step_* | tail -1; }
  for a in $R2; do
    $C train-gate --checkpoint "$(last $a)" --data "$R/synthmix2/train" --seq-len 256 --sequences ${GATE_SEQS:-2048} \
      --n-traces 16 --batch-size 32 --out "$out/gate_$a.json" > "$R/gate_$a.log" 2>&1
    tr '\r' '\n' < "$R/gate_$a.log" | grep -v "scoring positions" | tail -n 12 > "$out/gate_$a.log"
  done
  evaluate r2 $R2 &
  if [[ " $R2 " == *" copy-answer "* ]]; then  # deliberating before every answer token: scored that way
    $C eval synth --checkpoint "$(last copy-answer)" --heldout "$R/synth/heldout.jsonl" --deliberate every \
      --check-generate 10 --out "$out/synth_eval_every.json" > "$R/eval_every.log" 2>&1 &
  fi
  $C eval ppl --checkpoint $(for a in $R2; do last $a; done) --data default --heldout-sources sotu \
    --sequences ${SEQS:-32} --seq-len 1024 --offsets 1 2 4 8 16 32 --out "$out/general_ppl_r2.json" > "$R/ppl_r2.log" 2>&1
  tr '\r' '\n' < "$R/ppl_r2.log" | grep -v "^eval ppl" | tail -n 40 > "$out/general_ppl_r2.log"
  wait
  $C export --checkpoint "$(last lora32)" --out "$R/ship" --dtype bfloat16 > /dev/null
  tar czf "$R/r2c.tgz" -C "$out" . && rm -rf "${out:?}"/* && mv "$R/r2c.tgz" "$out/"  # a call brings back 8 files
  tar cf - -C "$R" ship | split -b 15m -d - "$out/ship.tar." ;;
r2one)  # the second round in one call (when the device time left allows one): the LoRA-rank arm alone, its gate, evals
  $C data synth --out "$R/synth" --train-docs "$DOCS" --heldout-per-level 100 > "$R/synth.log" 2>&1
  $C data synth --out "$R/synthmix2" --train-docs "$DOCS" --heldout-per-level 100 --mix-ratio 0.5 --mix-sources \
    default:pydoc default:gcide default:nlp default:moby default:jargon default:debref > "$R/synthmix2.log" 2>&1 &
  python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cpu')"  # convert once
  arm lora32 synth --init lora --lora-rank 32 --n-latents 16 --lr 1e-3
  wait
  summary lora32 > "$out/train.jsonl"; tr '\r' '\n' < "$R/s_lora32.log" | grep -v "^train" | tail -n 5 > "$out/train.log"
  cp "$R/synth/meta.json" "$out/synth_meta.json"; cp "$R/synthmix2/meta.json" "$out/synthmix2_meta.json"
  md5sum "$R/synth/heldout.jsonl" > "$out/heldout.md5"
  last() { ls -d "$R/s_$1"/step_* | tail -1; }
  $C train-gate --checkpoint "$(last lora32)" --data "$R/synthmix2/train" --seq-len 256 --sequences ${GATE_SEQS:-1024} \
    --n-traces 16 --batch-size 32 --out "$out/gate_lora32.json" > "$R/gate_lora32.log" 2>&1
  tr '\r' '\n' < "$R/gate_lora32.log" | grep -v "scoring positions" | tail -n 12 > "$out/gate_lora32.log"
  evaluate r2 lora32 &
  $C eval ppl --checkpoint "$(last lora32)" --data default --heldout-sources sotu --sequences ${SEQS:-16} --seq-len 1024 \
    --offsets 1 2 4 8 16 32 --out "$out/general_ppl_r2.json" > "$R/ppl_r2.log" 2>&1
  tr '\r' '\n' < "$R/ppl_r2.log" | grep -v "^eval ppl" | tail -n 40 > "$out/general_ppl_r2.log"
  wait
  $C export --checkpoint "$(last lora32)" --out "$R/ship" --dtype bfloat16 > /dev/null
  tar czf "$R/r2.tgz" -C "$out" . && rm -rf "${out:?}"/* && mv "$R/r2.tgz" "$out/"
  tar cf - -C "$R" ship | split -b 15m -d - "$out/ship.tar." ;;
*) echo "usage: $0 prep|a|b|c|r2a|r2b|r2c|r2one OUT" >&2; exit 2 ;;
esac
