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
#   bash experiments/speed.sh serve16 $OUT # session 16: serving on the real model (the engine loop's wake-up fix,
#                                          # policies interleaved, 10 repeats), then with the step compiled by inductor
#   bash experiments/speed.sh k16c $OUT    # session 16: trace chunks in bf16 on the real model (equivalence), K=16
#                                          # batch 32 with 4 traces per row (its compile artifacts, xz'd and split in
#                                          # 15 MiB pieces, come back in $OUT for the fresh-machine test), then C=8
#   bash experiments/speed.sh fresh $OUT   # session 16, on a fresh machine with the pieces staged in ~/cc: the same
#                                          # K=16 c4 step's first step with the artifacts and empty compiler caches;
#                                          # then a profile of the K=128 step (trace chunks C=8, batch 8)
#   bash experiments/speed.sh serve17 $OUT # serving with the step compiled, each request started with the coprocessor
#                                          # idle (fair async TTFT), async outcomes and the coprocessor's time beside
#                                          # the loop; a coprocessor call beside a decoding thread, in the process
#                                          # and in a child; then 128-token requests with the eager graphs
#   bash experiments/speed.sh fresh17a $OUT # session 17, fresh machine with ~/cc staged: the K=16 c4 step's cached first
#                                          # step (profiled); a real `cacheaug train` run writing its artifacts (.xz)
#   bash experiments/speed.sh fresh17b $OUT # the next fresh machine: that train run again (a repeat run's first step);
#                                          # K=128 with 2 trace groups and chunks C=8
#   bash experiments/speed.sh serve18 $OUT # the coprocessor stream at high CUDA priority: 128-token requests (eager
#                                          # graphs; each call's queued / launch / device time), the coprocessor beside
#                                          # an eager-graph decoding thread, then 64-token requests compiled at 1 / 8 / 32
#   bash experiments/speed.sh win18a $OUT  # session 18: trace windows (one trace per row, per-layer keys): bf16
#                                          # equivalence on the real model, one layer's attention in each layout, then
#                                          # K=128 batch 8 compiled with graphs (profiled)
#   bash experiments/speed.sh win18c $OUT  # trace windows with full layers chunked (C=8): one layer's attention in every
#                                          # layout, K=128 batch 8, then K=16 batch 32
#   bash experiments/speed.sh serve18b $OUT # the coprocessor call as CUDA graphs (--coprocessor-graphs): 128-token
#                                          # requests on the eager graphs, then 64-token ones compiled (1 request)
#   bash experiments/speed.sh k128g $OUT   # K=128 with 4 trace groups (stratified points, an option) and chunks C=8
#   bash experiments/speed.sh ddp $OUT     # (two GPUs) K=16 +k batch 64 on one GPU, then DDP over both at the
#                                          # same per-GPU batch
#   bash experiments/speed.sh kern20a $OUT # session 20: the trace kernel (--trace-kernel) on one layer (bf16 against
#                                          # the sdpa windows), then the real-model equivalence; kern20b: K=128 +k(+c8)
#   bash experiments/speed.sh kern21a $OUT # the kernel's tiles swept per pass, the fastest picked, K=128 +k with them
#                                          # (profiled); kern21b: K=128 +k at batch 16, K=16 +k at batch 32;
#                                          # kern21c: +k's real-model equivalence, then compiled serving with graphs
#   bash experiments/speed.sh kern22a $OUT # one layer with and without the mask skipped on fully seen tiles, real-model
#                                          # equivalence, K=128 +k batch 8 (profiled); kern22b: K=128 +k batch 16,
#                                          # K=16 +k batch 64 (profiled);
#                                          # serve22: compiled serving with coprocessor graphs, alone in a call
#   bash experiments/speed.sh kern23a $OUT # the kernel in the model's layout: equivalence, one-layer tile sweep (kernel
#                                          # rows), the fastest backward kept on the machine (~/tiles23.txt); then
#                                          # kern23b: K=128 +k batch 16 (library tiles, profiled; picked tiles), batch 24;
#                                          # kern23c: K=128 +k batch 32, K=16 +k batch 192 (picked tiles);
#                                          # kern23d: K=128 +k+r batch 16 (rotary tables), profiled
#   PYTHONPATH=$PWD/src bash experiments/speed.sh kern24a $OUT   # no staging (random-270m): K=128 +k+r at batch 32
#                                          # and 24; kern24b: K=128 +k+r batch 16 profiled, then +k (losses compared);
#                                          # serve24: serve22 at random weights; ddp24 (two GPUs): K=128 +k+r on one,
#                                          # then DDP and FSDP2 over both at the same per-GPU batch; fsdp24: FSDP2
#                                          # with the step compiled without CUDA graphs (+step)
#   bash experiments/speed.sh real25 $OUT  # (staged, gpu_env.sh) the real model: --trace-kernel --rope-table exact,
#                                          # then `cacheaug train` with configs/gemma3-270m-h200-k128.yaml (traces/s)
# Every job is cut at the call's time (CALL_S seconds, default 560) and writes its JSON after every row.
set -uo pipefail
stage=$1; out=${2:-out}; mkdir -p "$out"
T0=$(date +%s); CALL_S=${CALL_S:-560}
left() { echo $((CALL_S - ($(date +%s) - T0))); }
train17() {  # fresh17a / fresh17b: the same real training run, compiling then from the carried artifacts
  timeout $(left) python3 -m cacheaug train --data default --batch-size 32 --max-steps 4 --eval-every 0 \
    --save-every 0 --compile-step graphs --keep-logits --compile-cache /tmp/t17/cc_train.bin.xz \
    --out-dir /tmp/t17/run > /tmp/t17_train.log 2>&1
}
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
  serve16)
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    SL="python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --tokens 32 --concurrency 1 8 32"
    timeout $(left) $SL --out "$out/serve.json" > "$out/serve.log" 2>&1
    timeout $(left) $SL --compile-decode inductor --no-dynamic --out "$out/serve_compiled.json" \
      > "$out/serve_compiled.log" 2>&1
    timeout $(left) $SL --compile-decode inductor --no-dynamic --switch-interval 0.0005 \
      --out "$out/serve_switch.json" > "$out/serve_switch.log" 2>&1
    ;;
  k16c)
    R=/tmp/k16c; mkdir -p $R
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families gemma3 llama \
      --real gemma-3-270m --trace-chunk 4 --out "$out/eq_chunk.json" > "$out/eq_chunk.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+c4 --batch 32 --traces 16 --steps 10 \
      --compile-cache $R/cc.bin --out "$out/k16_c4.json" > "$out/k16_c4.log" 2>&1
    [ -s $R/cc.bin ] && python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.compress(
      open(sys.argv[1], 'rb').read(), preset=3))" $R/cc.bin $R/cc.bin.xz && split -b 15m -d $R/cc.bin.xz "$out/cc.bin.xz.part"
    ls -l $R "$out" >> "$out/k16_c4.log"
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+c8 --batch 32 --traces 16 --steps 10 \
      --out "$out/k16_c8.json" > "$out/k16_c8.log" 2>&1
    ;;
  fresh)
    R=/tmp/fresh; mkdir -p $R; cat ~/cc/cc.bin.xz.part* > $R/cc.bin.xz
    python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
      $R/cc.bin.xz $R/cc.bin; ls -l $R > "$out/fresh.log"
    TORCHINDUCTOR_CACHE_DIR=$R/inductor TRITON_CACHE_DIR=$R/triton timeout $(left) $TP \
      --variants sdpa+graphs+keeplogits+c4 --batch 32 --traces 16 --steps 3 --warmup 1 --compile-cache $R/cc.bin \
      --out "$out/fresh.json" >> "$out/fresh.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+c8 --batch 8 --traces 128 --steps 3 --warmup 2 \
      --profile "$out/profile_k128_c8.txt" --out "$out/k128_profile.json" > "$out/k128_profile.log" 2>&1
    ;;
  serve17)
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    SL="python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --tokens 32 --concurrency 1 8 32"
    timeout $(left) $SL --compile-decode inductor --no-dynamic --out "$out/serve_compiled.json" \
      > "$out/serve_compiled.log" 2>&1
    timeout $(left) python3 benchmarks/coprocessor_process.py --prompt-len 1024 --latents 16 --compile-decode inductor \
      --out "$out/proc_busy.json" > "$out/proc_busy.log" 2>&1
    timeout $(left) $SL --tokens 128 --no-dynamic --concurrency --out "$out/serve_128.json" > "$out/serve_128.log" 2>&1
    ;;
  fresh17a)
    # on a fresh machine with session 16's K=16 c4 artifacts staged in ~/cc: that step's cached first step again (its
    # spread across fresh machines) and a profile of two steps; then a real `cacheaug train` run (K=16, batch 32,
    # compiled with graphs, kept logits) that writes its artifacts, xz'd, for the next fresh machine (fresh17b)
    R=/tmp/fresh; mkdir -p $R; cat ~/cc/cc.bin.xz* > $R/cc.bin.xz; ls -l $R ~/cc > "$out/fresh.log"
    TORCHINDUCTOR_CACHE_DIR=$R/inductor TRITON_CACHE_DIR=$R/triton timeout $(left) $TP \
      --variants sdpa+graphs+keeplogits+c4 --batch 32 --traces 16 --steps 5 --warmup 2 --compile-cache $R/cc.bin.xz \
      --profile "$out/profile_k16_c4.txt" --out "$out/fresh_c4.json" >> "$out/fresh.log" 2>&1
    train17
    tr '\r' '\n' < /tmp/t17_train.log | grep -v "it/s\]$" | tail -n 30 > "$out/train_compile.log"
    cp /tmp/t17/run/metrics.jsonl "$out/train_compile_metrics.jsonl"
    [ -s /tmp/t17/cc_train.bin.xz ] && split -b 15m -d /tmp/t17/cc_train.bin.xz "$out/cc_train.bin.xz.part"
    ;;
  fresh17b)
    # on the next fresh machine with fresh17a's train artifacts staged in ~/cc: the same `cacheaug train` run again,
    # a repeat run's first step (issue: < 30 s); then K=128 with 2 trace groups and chunks C=8 in the time left
    mkdir -p /tmp/t17; cat ~/cc/cc_train.bin.xz.part* > /tmp/t17/cc_train.bin.xz; ls -l /tmp/t17 > "$out/fresh_train.log"
    train17
    tr '\r' '\n' < /tmp/t17_train.log | grep -v "it/s\]$" | tail -n 30 >> "$out/fresh_train.log"
    cp /tmp/t17/run/metrics.jsonl "$out/fresh_train_metrics.jsonl"
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+g2+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_g2c8.json" > "$out/k128_g2c8.log" 2>&1
    ;;
  serve18)
    # the coprocessor's stream at the highest CUDA priority: do async latents now arrive while the request decodes?
    # (session 17: late in every request, the call 78-512 ms beside the loop); and 32 async requests with the
    # compiled step's symbolic sizes (session 17: 28 tokens/s, new shapes compiling in the timed window)
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    SL="python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --no-dynamic"
    timeout $(left) $SL --tokens 128 --concurrency --coprocessor-priority high --out "$out/serve_128_high.json" \
      > "$out/serve_128_high.log" 2>&1
    timeout $(left) python3 benchmarks/coprocessor_process.py --prompt-len 1024 --latents 16 \
      --out "$out/proc_busy_eager.json" > "$out/proc_busy_eager.log" 2>&1   # beside eager-graph steps (17: compiled)
    timeout $(left) $SL --tokens 64 --concurrency 1 8 32 --compile-decode inductor --coprocessor-priority high \
      --out "$out/serve_compiled_high.json" > "$out/serve_compiled_high.log" 2>&1
    ;;
  win18a)
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-windows --out "$out/eq_windows.json" > "$out/eq_windows.log" 2>&1
    timeout $(left) python3 benchmarks/trace_attention.py --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+w --batch 8 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_w.txt" --out "$out/k128_w.json" > "$out/k128_w.log" 2>&1
    ;;
  win18c)
    timeout $(left) python3 benchmarks/trace_attention.py --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+w+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_wc8.json" > "$out/k128_wc8.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+w+c8 --batch 32 --traces 16 --steps 10 \
      --out "$out/k16_wc8.json" > "$out/k16_wc8.log" 2>&1
    ;;
  serve18b)
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    SL="python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --no-dynamic --coprocessor-graphs"
    timeout $(left) $SL --tokens 128 --concurrency --out "$out/serve_128_graphs.json" > "$out/serve_128_graphs.log" 2>&1
    timeout $(left) $SL --tokens 64 --concurrency 1 --compile-decode inductor --out "$out/serve_compiled_graphs.json" \
      > "$out/serve_compiled_graphs.log" 2>&1
    ;;
  k128g)
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+g4+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_g4c8.json" > "$out/k128_g4c8.log" 2>&1
    ;;
  ddp)  # the fastest K=16 step (trace kernel, session 22) on one GPU, then DDP over both at the same per-GPU batch
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 64 --traces 16 --steps 6 --warmup 2 --world 2 \
      --out "$out/ddp.json" > "$out/ddp.log" 2>&1
    ;;
  kern19a)  # cacheaug's trace kernel: exactness on the GPU (fp32 and a bf16 step), one layer's attention, K=128
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --trace-chunk 8 --out "$out/eq_kernel.json" > "$out/eq_kernel.log" 2>&1
    timeout $(left) python3 benchmarks/trace_attention.py --kernel-tiles 64,64,4,2 64,64,8,2 64,32,4,3 32,64,4,2 \
      128,64,8,2 --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_k.txt" --out "$out/k128_kc8.json" > "$out/k128_kc8.log" 2>&1
    ;;
  kern19b)  # full layers one trace per row (the kernel skips what a trace cannot see); K=16
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 8 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_k.json" > "$out/k128_k.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k+c8 --batch 32 --traces 16 --steps 10 \
      --out "$out/k16_kc8.json" > "$out/k16_kc8.log" 2>&1
    ;;
  kern20a)  # session 20: the kernels with the shared-memory fallback: one layer's attention (bf16 diffs), then the
            # real-model equivalence (fp32 and a bf16 step)
    timeout $(left) python3 benchmarks/trace_attention.py --steps 5 --kernel-tiles 64,64,4,2 64,32,4,2 32,64,4,2 \
      128,64,8,2 --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --trace-chunk 8 --out "$out/eq_kernel.json" > "$out/eq_kernel.log" 2>&1
    ;;
  kern20b)  # K=128 compiled with the kernel and chunks C=8 (profiled), then without chunks
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k+c8 --batch 8 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_k.txt" --out "$out/k128_kc8.json" > "$out/k128_kc8.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 8 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_k.json" > "$out/k128_k.log" 2>&1
    ;;
  kern21a)  # session 21: the kernels' tiles swept per pass (forward alone; backward with the default forward), the
            # fastest summed over the model's layers (experiments/pick_tiles.py, kept in /tmp/tiles.txt for kern21b),
            # then K=128 +k compiled with them (profiled)
    timeout $(left) python3 benchmarks/trace_attention.py --steps 3 \
      --kernel-tiles 64,64,4,2 64,64,8,2 128,64,8,2 64,32,8,2 \
      --kernel-backward-tiles 64,32,4,2 64,32,8,2 64,64,8,1 32,64,4,2 128,32,8,1 \
      --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    python3 experiments/pick_tiles.py "$out/trace_attention.json" --explain > /tmp/tiles.txt 2> "$out/tiles.log" \
      || echo "64,64,4,2/64,32,4,2" > /tmp/tiles.txt
    cp /tmp/tiles.txt "$out/tiles.txt"
    CACHEAUG_TRACE_KERNEL_TILES=$(cat /tmp/tiles.txt) timeout $(left) $TP --variants sdpa+graphs+keeplogits+k \
      --batch 8 --traces 128 --steps 5 --warmup 2 --profile "$out/profile_k128_k.txt" --out "$out/k128_k.json" \
      > "$out/k128_k.log" 2>&1
    ;;
  kern21b)  # K=128 +k at batch 16, then K=16 +k at batch 32, with kern21a's tiles when the machine kept them
    export CACHEAUG_TRACE_KERNEL_TILES=$(cat /tmp/tiles.txt 2>/dev/null || echo "64,64,4,2/64,32,4,2")
    echo "$CACHEAUG_TRACE_KERNEL_TILES" > "$out/tiles.txt"
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 16 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_k_b16.json" > "$out/k128_k_b16.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 32 --traces 16 --steps 10 \
      --out "$out/k16_k.json" > "$out/k16_k.log" 2>&1
    ;;
  kern21c)  # the fastest setup (+k: one trace per row on every layer) on the real model (fp32 and a bf16 step), then
            # serving with the coprocessor as CUDA graphs and the decoding step compiled
    export CACHEAUG_TRACE_KERNEL_TILES=$(cat /tmp/tiles.txt 2>/dev/null || echo "64,64,4,2/64,32,4,2")
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --out "$out/eq_kernel_c1.json" > "$out/eq_kernel_c1.log" 2>&1
    SL="python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --no-dynamic --coprocessor-graphs"
    timeout $(left) $SL --tokens 64 --concurrency 1 8 32 --compile-decode inductor \
      --out "$out/serve_compiled_graphs.json" > "$out/serve_compiled_graphs.log" 2>&1
    ;;
  kern22a)  # session 22: one layer at the library's tiles with and without the mask skipped where every query sees
            # (the row "mask on every tile"), the real-model equivalence with it, then K=128 +k at batch 8 (profiled)
    timeout $(left) python3 benchmarks/trace_attention.py --steps 5 --kernel-tiles 64,64,4,2 128,64,8,2 \
      --kernel-backward-tiles 64,32,4,2 64,32,8,2 --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --out "$out/eq_kernel.json" > "$out/eq_kernel.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 8 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_k.txt" --out "$out/k128_k.json" > "$out/k128_k.log" 2>&1
    ;;
  kern22b)  # K=128 +k at batch 16, then K=16 +k at batch 64 (16.3 GiB at 32 in session 21), profiled
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 16 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_k_b16.json" > "$out/k128_k_b16.log" 2>&1
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 64 --traces 16 --steps 6 --warmup 2 \
      --profile "$out/profile_k16_k.txt" --out "$out/k16_k_b64.json" > "$out/k16_k_b64.log" 2>&1
    ;;
  kern23a)  # session 23: the kernel reads and writes the model's layout (no per-layer copies) and computes rowsum(dO x O)
            # itself: the real-model equivalence, then one layer (kernel rows only) at forward and backward settings;
            # the fastest backward (the library's forward kept) stays on the machine for kern23b (~/tiles23.txt)
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --out "$out/eq_kernel.json" > "$out/eq_kernel.log" 2>&1
    timeout $(( $(left) - 20 )) python3 benchmarks/trace_attention.py --kernel-only --steps 10 \
      --kernel-tiles 128,64,8,2 64,64,4,2 64,32,4,2 \
      --kernel-backward-tiles 64,32,4,2 64,16,4,2 128,16,8,2 128,32,8,2 64,64,4,2 \
      --out "$out/trace_attention.json" > "$out/trace_attention.log" 2>&1
    python3 experiments/pick_tiles.py "$out/trace_attention.json" --explain --backward-only > "$out/tiles.txt" \
      2> "$out/tiles.log" || echo "default" > "$out/tiles.txt"
    cp "$out/tiles.txt" ~/tiles23.txt
    ;;
  kern23b)  # K=128 +k at batch 16 at the library's tiles (this session's kernel against session 22's 7.79k; profiled),
            # again with kern23a's backward where it picked another, then batch 24 with the pick
    tiles=$(cat ~/tiles23.txt 2>/dev/null || echo default); echo "$tiles" > "$out/tiles_used.txt"
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 16 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_b16.txt" --out "$out/k128_b16.json" > "$out/k128_b16.log" 2>&1
    if [ "$tiles" != "default" ] && [ "$tiles" != "default/64,32,4,2" ]; then
      CACHEAUG_TRACE_KERNEL_TILES=$tiles timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 16 \
        --traces 128 --steps 5 --warmup 2 --out "$out/k128_b16_tiles.json" > "$out/k128_b16_tiles.log" 2>&1
    fi
    CACHEAUG_TRACE_KERNEL_TILES=$tiles timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 24 \
      --traces 128 --steps 5 --warmup 2 --out "$out/k128_b24.json" > "$out/k128_b24.log" 2>&1
    ;;
  kern23c)  # K=128 +k at batch 32 (85 GiB at 24 in session 22) and K=16 +k at batch 192, with kern23a's backward
    tiles=$(cat ~/tiles23.txt 2>/dev/null || echo default); echo "$tiles" > "$out/tiles_used.txt"
    CACHEAUG_TRACE_KERNEL_TILES=$tiles timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 32 \
      --traces 128 --steps 5 --warmup 2 --out "$out/k128_b32.json" > "$out/k128_b32.log" 2>&1
    CACHEAUG_TRACE_KERNEL_TILES=$tiles timeout $(left) $TP --variants sdpa+graphs+keeplogits+k --batch 192 \
      --traces 16 --steps 5 --warmup 2 --out "$out/k16_b192.json" > "$out/k16_b192.log" 2>&1
    ;;
  kern23d)  # K=128 +k+r at batch 16: rotary tables (cacheaug.rope; the step's rotary kernels computed exact cos/sin per
            # element), profiled, against kern23b's 7.77k without
    timeout $(left) $TP --variants sdpa+graphs+keeplogits+k+r --batch 16 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_b16_r.txt" --out "$out/k128_b16_r.json" > "$out/k128_b16_r.log" 2>&1
    ;;
  kern24a)  # session 24, no staging (--model random-270m: the architecture at random weights; run with PYTHONPATH=src
            # instead of gpu_env.sh): K=128 +k+r at batch 32 (7.97k without tables), then at 24
    RM="--model random-270m"
    timeout $(left) $TP $RM --variants sdpa+graphs+keeplogits+k+r --batch 32 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_r_b32.json" > "$out/k128_r_b32.log" 2>&1
    timeout $(left) $TP $RM --variants sdpa+graphs+keeplogits+k+r --batch 24 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_r_b24.json" > "$out/k128_r_b24.log" 2>&1
    ;;
  kern24b)  # no staging: K=128 +k+r at batch 16 profiled (what the tables left), then +k at batch 16 on the same machine:
            # the tables' gain measured side by side, and the first-step losses of the two (same seed, same text, points
            # and weights) compared: the tables' eager cos/sin against the compiled step's own
    RM="--model random-270m"
    timeout $(left) $TP $RM --variants sdpa+graphs+keeplogits+k+r --batch 16 --traces 128 --steps 5 --warmup 2 \
      --profile "$out/profile_k128_r_b16.txt" --out "$out/k128_r_b16.json" > "$out/k128_r_b16.log" 2>&1
    timeout $(left) $TP $RM --variants sdpa+graphs+keeplogits+k --batch 16 --traces 128 --steps 5 --warmup 2 \
      --out "$out/k128_b16.json" > "$out/k128_b16.log" 2>&1
    ;;
  ddp24)  # two GPUs, no staging: K=128 +k+r at batch 16 on one GPU, then over both at the same per-GPU batch, the
           # coprocessor replicated (DDP: the 1.9x target) and then sharded per layer (FSDP2, measured)
    timeout $(left) $TP --model random-270m --variants sdpa+graphs+keeplogits+k+r --batch 16 --traces 128 --steps 5 \
      --warmup 2 --world 2 --parallel ddp fsdp --out "$out/ddp24.json" > "$out/ddp24.log" 2>&1
    ;;
  fsdp24)  # two GPUs, no staging, after ddp24: FSDP2 with the step compiled but not replayed as CUDA graphs (+step), in
            # case FSDP2's collectives do not go into ddp24's graphs; one GPU first at the same variant for the scaling
    timeout $(left) $TP --model random-270m --variants sdpa+step+keeplogits+k+r --batch 16 --traces 128 --steps 5 \
      --warmup 2 --world 2 --parallel fsdp --out "$out/fsdp24.json" > "$out/fsdp24.log" 2>&1
    ;;
  real25)  # staged (the real model and the default corpus, scripts/gpu_env.sh): the fastest setup's equivalence on the
            # real model (trace kernel + rotary tables; fp32 and a bf16 step), then a real `cacheaug train` with the K=128
            # config (batch 24, 40 steps): the trainer's traces/s in metrics.jsonl against the benchmark's 8.67k
    timeout $(left) python3 scripts/check_equivalence.py --device cuda --backends sdpa --families --real gemma-3-270m \
      --trace-kernel --rope-table --out "$out/eq_kernel_rope.json" > "$out/eq_kernel_rope.log" 2>&1
    # an H100 (80 GB) cannot hold batch 24 (84 GiB): batch 16 there, and the benchmark's figure on the same card after
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1); bs=24; [ "$mib" -lt 100000 ] && bs=16
    timeout $(left) python3 -m cacheaug train --config configs/gemma3-270m-h200-k128.yaml --max-steps 40 \
      --batch-size $bs --log-every 10 --eval-every 0 --save-every 0 --out-dir /tmp/t25/run \
      --compile-cache /tmp/t25/cc.bin.xz > "$out/train25.log" 2>&1
    cp /tmp/t25/run/metrics.jsonl "$out/train25_metrics.jsonl" 2>/dev/null
    [ "$bs" = 16 ] && [ "$(left)" -gt 200 ] && timeout $(left) $TP --model random-270m \
      --variants sdpa+graphs+keeplogits+k+r --batch 16 --traces 128 --steps 5 --warmup 2 --out "$out/tp_b16.json" \
      > "$out/tp_b16.log" 2>&1
    ;;
  serve24)  # no staging: serving with coprocessor graphs and the compiled decoding step (serve22's), random weights
    timeout $(left) python3 benchmarks/serve_latency.py --model random-270m --prompt-lens 1024 --latents 16 \
      --repeats 10 --no-dynamic --coprocessor-graphs --tokens 64 --concurrency 1 8 32 --compile-decode inductor \
      --out "$out/serve_compiled_graphs.json" > "$out/serve_compiled_graphs.log" 2>&1
    ;;
  serve25)  # no staging: serve24 again with each async insertion's time on the loop's thread (insert_s: at batch 1 and
            # at 8 / 32 requests, with how many were augmented): where 32 async requests' 426 tokens/s (off: 1,338) go
    timeout $(left) python3 benchmarks/serve_latency.py --model random-270m --prompt-lens 1024 --latents 16 \
      --repeats 10 --no-dynamic --coprocessor-graphs --tokens 64 --concurrency 1 8 32 --compile-decode inductor \
      --out "$out/serve_insert.json" > "$out/serve_insert.log" 2>&1
    ;;
  serve22)  # serving with the coprocessor as CUDA graphs and the decoding step compiled, alone in its call
    python3 -c "from cacheaug import load_base_model; load_base_model('gemma-3-270m', device='cuda')" \
      > "$out/convert.log" 2>&1
    timeout $(left) python3 benchmarks/serve_latency.py --prompt-lens 1024 --latents 16 --repeats 10 --no-dynamic \
      --coprocessor-graphs --tokens 64 --concurrency 1 8 32 --compile-decode inductor \
      --out "$out/serve_compiled_graphs.json" > "$out/serve_compiled_graphs.log" 2>&1
    ;;
  *) echo "unknown stage $stage (serve | k128 | k128b | serve16 | k16c | fresh | serve17 | fresh17a | fresh17b | serve18 | win18a | win18c | serve18b | k128g | ddp | kern19a | kern19b | kern20a | kern20b | kern21a | kern21b | kern21c | kern22a | kern22b | kern23a | kern23b | kern23c | kern23d | kern24a | kern24b | ddp24 | fsdp24 | real25 | serve24 | serve25 | serve22)" >&2
     exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv > "$out/gpus.csv" 2>&1
tail -n 5 "$out"/*.log
# a call brings back at most 8 files: everything but the compile-artifact pieces goes back as one archive
(cd "$out" && files=$(ls | grep -v '^cc\(_train\)\?\.bin') && tar czf results.tgz --remove-files $files)
