#!/usr/bin/env bash
# The mechanism test on the GPU (docs/results.md, "Does the coprocessor compute?"): the synthetic corpus, eight arms
# with one budget (four beside each other on each of two GPUs), then answer loss and exact match on held-out
# problems, and the effect of the synth-trained coprocessors on general held-out text.
# On the GPU machine, after `source scripts/gpu_env.sh`:  bash experiments/mechanism.sh $OUT [STEPS]
set -uo pipefail
out=${1:-out}; steps=${2:-500}; R=${RUNS:-/tmp/cacheaug_runs}; mkdir -p "$R" "$out"
C="python3 -m cacheaug"
$C data synth --out "$R/synth" --train-docs 12000 > "$R/synth.log" 2>&1
python3 -c "from cacheaug.base import load_gemma3_tokenizer as t; from cacheaug.data import build_token_files as b; \
print(b(t(), ['$R/synth/train'], 1.0))"
TR="--model gemma-3-270m --data $R/synth/train --seq-len 256 --n-ahead 16 --n-traces 16 --batch-size 32 \
--max-steps $steps --max-minutes 5 --warmup-steps 50 --eval-every 0 --save-every 0"
run() { gpu=$1; name=$2; shift 2; CUDA_VISIBLE_DEVICES=$gpu $C train $TR "$@" --out-dir "$R/m_$name" > "$R/m_$name.log" 2>&1; }
run 0 copy-nl4-marker --n-latents 4 --insertion marker &
run 0 copy-nl16-marker --n-latents 16 --insertion marker &
run 0 copy-nl64-marker --n-latents 64 --insertion marker &
run 0 pause-nl16-marker --init pause --insertion marker &
run 1 lora-decoder-marker --init lora-decoder --insertion marker &
run 1 copy-nl16-random --n-latents 16 &
run 1 pause-nl16-random --init pause &
run 1 lora-decoder-random --init lora-decoder &
wait
ckpts=$(for d in "$R"/m_*/; do ls -d "$d"step_* | tail -1; done)
$C eval synth --checkpoint $ckpts --heldout "$R/synth/heldout.jsonl" --check-generate 40 --out "$out/synth_eval.json" \
  > "$R/eval.log" 2>&1
$C eval ppl --checkpoint "$(ls -d $R/m_copy-nl16-marker/step_* | tail -1)" "$(ls -d $R/m_copy-nl16-random/step_* | tail -1)" \
  --data default --sequences 16 --offsets 1 2 4 8 16 --out "$out/synth_general_ppl.json" > "$R/ppl.log" 2>&1
python3 -c "import json, pathlib, sys; [print(json.dumps({'arm': d.name[2:], **json.loads(l)})) for d in \
sorted(pathlib.Path(sys.argv[1]).glob('m_*/')) for l in (d / 'metrics.jsonl').read_text().splitlines()]" "$R" \
  > "$out/synth_metrics.jsonl"
cp "$R/synth/meta.json" "$out/synth_meta.json"
tail -n 6 "$R"/m_*.log "$R/synth.log" > "$out/train.log"; tail -n 40 "$R/eval.log" "$R/ppl.log" > "$out/eval.log"
