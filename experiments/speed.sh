#!/usr/bin/env bash
# The serving and training-throughput targets (issues "serving engine v2" and "training throughput"), measured on
# the GPU machine (one H200), after `source scripts/gpu_env.sh`, in three calls back to back (the converted model
# and the inductor caches of a call stay in /tmp on the warm machine):
#   bash experiments/speed.sh serve $OUT   # model conversion; serving latency; the coprocessor in a separate
#                                          # process; then the K=16 compiled step (batch 32) with its first step cold
#                                          # and cached in a fresh process, in the call's remaining time
#   bash experiments/speed.sh k128 $OUT    # K=128 traces per sequence, compiled step with CUDA graphs: sdpa with 8
#                                          # traces per row (trace chunks), batch 8 then 16
#   bash experiments/speed.sh k128b $OUT   # the same with FlexAttention block masks, then sdpa with 4 traces per row
#   bash experiments/speed.sh ddp $OUT     # (two GPUs) K=16 batch 32 on one GPU, then DDP over both at the same
#                                          # per-GPU batch
# Every job is cut at the call's time (CALL_S seconds, default 560) and writes its JSON after every row.
set -uo pipefail
stage=$1; out=${2:-out}; mkdir -p "$out"
T0=$(date +%s); CALL_S=${CALL_S:-560}
left() { echo $((CALL_S - ($(date +%s) - T0))); }
TP="python3 benchmarks/train_throughput.py"
case $stage in
  serve)
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    timeout $(left) python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 5 --tokens 32 \
      --concurrency 1 8 32 --out "$out/serve.json" > "$out/serve.log" 2>&1
    timeout $(left) python3 benchmarks/coprocessor_process.py --prompt-len 1024 --latents 16 \
      --out "$out/proc.json" > "$out/proc.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits --batch 32 --traces 16 --steps 10 --cached-repeat \
      --out "$out/tp_k16.json" > "$out/tp_k16.log" 2>&1
    ;;
  k128)
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --batches 16 --out "$out/k128_c8.json" > "$out/k128_c8.log" 2>&1
    ;;
  k128b)
    timeout $(left) $TP --variants flex+masks+graphs+keeplogits sdpa+graphs+keeplogits+c4 --batch 8 --traces 128 \
      --steps 5 --warmup 2 --out "$out/k128_flex_c4.json" > "$out/k128_flex_c4.log" 2>&1
    ;;
  ddp)
    timeout $(left) $TP --variants sdpa+graphs+keeplogits --batch 32 --traces 16 --steps 10 --world 2 \
      --out "$out/ddp.json" > "$out/ddp.log" 2>&1
    ;;
  *) echo "unknown stage $stage (serve | k128 | k128b | ddp)" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv > "$out/gpus.csv" 2>&1
tail -n 5 "$out"/*.log
