"""Training throughput: text tokens/s, model FLOP utilisation and peak memory of one optimizer step.

Canonical config (issue 3): Gemma 3 270M frozen, full-copy coprocessor, T=1024, K=16, N_L=16, N_A=16, bf16
autocast with fp32 master weights, one H200:

    python benchmarks/train_throughput.py --model gemma-3-270m --batch 8 --seq-len 1024 --traces 16 128 \
        --compare-loop --out throughput.json

CPU smoke run (what CI exercises): python benchmarks/train_throughput.py --model tiny --steps 2 --warmup 1

FLOPs counted per optimizer step (N = non-embedding parameters of the decoder, D = hidden size, V = vocab;
attention score FLOPs and the optimizer are not counted):
    prefix pass (no grad)                     2 N . B T
    coprocessor forward + backward            6 N_c . B K N_L          (N_c = trainable coprocessor params)
    decoder on [latents; ahead] fwd + bwd-x   4 N . B K (N_L + N_A - 1)
    LM head on targets (fwd, recompute, bwd-x) 6 V D . B K N_A
MFU = counted FLOP/s / 790e12 (the H200's measured dense bf16 rate, see the device notes); on the CPU MFU is
not reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, load_base_model
from cacheaug.evaluate import autocast_for
from cacheaug.testing import tiny_model
from cacheaug.train import _master_fp32

PEAK_BF16 = 790e12


def step_flops(model: CacheAugmentedLM, B: int, T: int, K: int) -> float:
    cfg = model.config
    emb = model.base.get_input_embeddings().weight
    V, D = emb.shape
    N = sum(p.numel() for p in model.base.parameters()) - emb.numel()
    N_c = sum(p.numel() for p in model.trainable_parameters())
    return (2 * N * B * T + 6 * N_c * B * K * cfg.n_latents + 4 * N * B * K * (cfg.n_latents + cfg.n_ahead - 1)
            + 6 * V * D * B * K * cfg.n_ahead)


def measure(model, B, T, K, steps, warmup, loop=False) -> dict:
    device = model.device
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    vocab = model.base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (B, T), generator=g).to(device)
    positions = torch.stack([torch.randperm(T - model.config.n_ahead, generator=g)[:K].sort().values for _ in range(B)])

    def one_step():
        with autocast_for(model):
            if loop:  # the naive baseline: one full three-pass forward per trace
                for k in range(K):
                    (model(ids, positions=positions[:, k : k + 1]).loss / K).backward()
            else:
                model(ids, positions=positions).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    flops = step_flops(model, B, T, K)
    row = {"K": K, "loop": loop, "seconds_per_step": round(dt, 4), "text_tokens_per_s": round(B * T / dt),
           "counted_gflop_per_step": round(flops / 1e9, 3), "tflop_per_s": round(flops / dt / 1e12, 4)}
    if device.type == "cuda":
        row["mfu_pct"] = round(100 * flops / dt / PEAK_BF16, 2)
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m' or 'tiny' (random 3-layer Gemma-3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default=None, help="attention backend (default: flex_attention on GPU, sdpa on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--traces", type=int, nargs="+", default=[16])
    ap.add_argument("--n-latents", type=int, default=16)
    ap.add_argument("--n-ahead", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare-loop", action="store_true", help="also time a per-trace loop at the first K")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.model == "tiny":
        base = tiny_model("gemma3", args.attn or "sdpa", device=device)
        args.seq_len = min(args.seq_len, 128)
    else:
        base, _ = load_base_model(args.model, device=device, attn_implementation=args.attn)
    rows = []
    for K in args.traces:
        model = CacheAugmentedLM(base, CoprocessorConfig(args.n_latents, args.n_ahead, K), check_finite=False)
        _master_fp32(model)
        rows.append(measure(model, args.batch, args.seq_len, K, args.steps, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
        if args.compare_loop and K == args.traces[0]:
            rows.append(measure(model, args.batch, args.seq_len, K, max(1, args.steps // 4), 1, loop=True))
            rows[-1]["speedup_of_parallel"] = round(rows[-1]["seconds_per_step"] / rows[-2]["seconds_per_step"], 2)
            print(json.dumps(rows[-1]), flush=True)
        del model
    result = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "attn": base.config._attn_implementation, "batch": args.batch, "seq_len": args.seq_len,
              "n_latents": args.n_latents, "n_ahead": args.n_ahead, "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
