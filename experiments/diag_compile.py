"""Does the compiled training step (``compile_step`` = step / graphs) train like the eager one?

From the same initial coprocessor and the same batches, run ``--steps`` optimizer steps eagerly and with each
compiled mode; report the per-step losses and the largest parameter difference at the end. bf16 autocast with
fp32 masters, as in training. On a GPU:

    python3 experiments/diag_compile.py --out $OUT/diag_compile.json                 # Gemma 3 270M, B=8, T=1024
    python3 experiments/diag_compile.py --model tiny --device cpu --modes step --out d.json   # smoke run

Expect bf16-level agreement (losses within about 1e-2 nats), not bit equality: inductor fuses differently.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from cacheaug import CoprocessorConfig, build_model, load_base_model
from cacheaug.evaluate import autocast_for
from cacheaug.masks import stratified_positions
from cacheaug.speed import apply_speed_options
from cacheaug.testing import tiny_model
from cacheaug.train import master_fp32


def run(model, batches, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, fused=model.device.type == "cuda")
    losses = []
    for ids, pos in batches:
        with autocast_for(model):
            out = model(ids, positions=pos)
        out.loss.backward()
        losses.append(float(out.loss.detach()))  # read before the next step: CUDA graphs reuse their output buffers
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m' or 'tiny'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--modes", nargs="+", default=["step", "graphs"], choices=["step", "graphs"])
    ap.add_argument("--trace-groups", type=int, default=1, help="trace groups (stratified points) in every run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.model == "tiny":
        base = tiny_model("gemma3", device=device)
        args.seq_len = min(args.seq_len, 64)
    else:
        base = load_base_model(args.model, device=device, attn_implementation="sdpa")[0]
    cfg = CoprocessorConfig(3, 4, 4) if args.model == "tiny" else CoprocessorConfig(16, 16, 16)  # canonical N_L, N_A, K
    g = torch.Generator().manual_seed(0)
    vocab = base.get_input_embeddings().weight.shape[0]
    batches = [
        (
            torch.randint(3, vocab, (args.batch, args.seq_len), generator=g).to(device),
            stratified_positions(args.batch, args.seq_len - cfg.n_ahead, cfg.n_traces, args.trace_groups, g),
        )
        for _ in range(args.steps)
    ]
    model = build_model(base, cfg, check_finite=False)
    master_fp32(model)
    apply_speed_options(model, trace_groups=args.trace_groups)
    start = copy.deepcopy(model.coprocessor.state_dict())
    res = {
        "model": args.model,
        "trace_groups": args.trace_groups,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "torch": torch.__version__,
    }
    t0 = time.perf_counter()
    res["eager"] = {"losses": run(model, batches, args.lr), "seconds": round(time.perf_counter() - t0, 1)}
    final = {k: v.detach().clone() for k, v in model.coprocessor.state_dict().items()}
    print("eager", res["eager"], flush=True)
    for mode in args.modes:
        torch._dynamo.reset()
        model = build_model(base, cfg, check_finite=False)
        master_fp32(model)
        model.coprocessor.load_state_dict(start)
        apply_speed_options(model, compile_step=mode, trace_groups=args.trace_groups)
        t0 = time.perf_counter()
        losses = run(model, batches, args.lr)
        params = model.coprocessor.state_dict()
        diff = max(float((params[k].float() - final[k].float()).abs().max()) for k in final)
        scale = max(float(final[k].float().abs().max()) for k in final)
        res[mode] = {
            "losses": losses,
            "seconds_incl_compile": round(time.perf_counter() - t0, 1),
            "max_loss_diff_vs_eager": max(abs(a - b) for a, b in zip(losses, res["eager"]["losses"])),
            "max_param_diff_vs_eager": diff,
            "max_abs_param": scale,
        }
        print(mode, res[mode], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
