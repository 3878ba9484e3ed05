"""Check parallel training pass == augment + plain decoding, trace by trace, on any device and backend.

The test suite covers the CPU in fp32. This script is for the GPU, with flex_attention and sdpa:

    python scripts/check_equivalence.py --device cuda --backends flex_attention sdpa --real gemma-3-270m \
        --out equivalence.json

Each case builds the model in fp32, computes the per-trace, per-offset losses of both paths (training pass;
``augment`` + plain decoding), then casts the same model to bf16 and computes both again. Reported:

* ``fp32_max_err``: max |training - reference| in fp32: the exactness check proper;
* ``bf16_train_vs_ref``: max / mean |training - reference| in bf16;
* ``bf16_train_vs_fp32`` and ``bf16_ref_vs_fp32``: how far each bf16 path is from the fp32 result. If the
  training pass is right, it is no further from fp32 than the reference path is: bf16 rounding then
  explains all of ``bf16_train_vs_ref``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, load_base_model
from cacheaug.corpus import builtin_text
from cacheaug.masks import groups_fitting
from cacheaug.speed import apply_speed_options
from cacheaug.testing import FAMILIES, attn_for, perturb_trainable, reference_losses, tiny_model


@torch.no_grad()
def both_paths(model, ids, positions) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Training-pass and reference losses, each ``[B, K, N_A]`` float32."""
    out = model(ids, positions=positions, return_base_losses=True)
    ref = torch.stack(
        [
            torch.stack([reference_losses(model, ids[b : b + 1], p) for p in positions[b].tolist()])
            for b in range(len(ids))
        ]
    )
    return out.token_losses, ref, out


def _stats(err: torch.Tensor) -> dict:
    err = err.abs().flatten().float()
    return {"max": round(err.max().item(), 6), "mean": round(err.mean().item(), 6)}


def check(model, ids, positions, fp32: bool = True) -> dict:
    t0 = time.perf_counter()
    if not fp32:  # bf16 only: the two paths against each other
        train16, ref16, out = both_paths(model.to(torch.bfloat16), ids, positions)
        return {
            "bf16_train_vs_ref": _stats(train16 - ref16),
            "mean_loss": round(out.token_losses.mean().item(), 4),
            "mean_base_loss": round(out.base_token_losses.mean().item(), 4),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    train32, ref32, out = both_paths(model, ids, positions)
    model.to(torch.bfloat16)
    train16, ref16, _ = both_paths(model, ids, positions)
    return {
        "fp32_err": _stats(train32 - ref32),
        "bf16_train_vs_ref": _stats(train16 - ref16),
        "bf16_train_vs_fp32": _stats(train16 - ref32),
        "bf16_ref_vs_fp32": _stats(ref16 - ref32),
        "gain_max": round((out.token_losses - out.base_token_losses).abs().max().item(), 4),
        "mean_loss": round(out.token_losses.mean().item(), 4),
        "mean_base_loss": round(out.base_token_losses.mean().item(), 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train_step_check(model, ids) -> dict:
    """One optimizer step, fp32 master weights under bf16 autocast: finite loss and gradients, base untouched."""
    model.coprocessor.float()
    before = {n: t.clone() for n, t in list(model.base.state_dict().items())[:4]}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        out = model(ids)
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    opt.step()
    return {
        "loss": round(out.loss.item(), 4),
        "grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "base_unchanged": all(torch.equal(model.base.state_dict()[n], t) for n, t in before.items()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=["flex_attention", "sdpa"])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--real", default=None, help="also check a real model, e.g. gemma-3-270m")
    ap.add_argument("--real-length", type=int, default=1024, help="T for the real model (> its sliding window)")
    ap.add_argument(
        "--real-bf16-only",
        nargs="*",
        default=["flex_attention"],
        help="backends for which the real model is checked in bf16 only (flex in fp32 at head_dim 256 "
        "ran over 8 minutes on an H200)",
    )
    ap.add_argument(
        "--trace-groups",
        type=int,
        default=1,
        help="run the real model's training pass with this many trace groups (its points fit G=2 and 4)",
    )
    ap.add_argument(
        "--trace-chunk",
        type=int,
        default=0,
        help="run every training pass with this many traces per row (trace chunks; 0 = packed; divides 4 "
        "for the tiny models and 8 for the real one)",
    )
    ap.add_argument(
        "--trace-windows",
        action="store_true",
        help="run every training pass with trace windows (one trace per row, per-layer keys; sdpa with "
        "Gemma-3 or Qwen-2/3 only: other families are skipped)",
    )
    ap.add_argument(
        "--trace-kernel",
        action="store_true",
        help="trace windows through cacheaug's kernel (cacheaug.prefix_attention; implies --trace-windows)",
    )
    ap.add_argument(
        "--rope-table",
        action="store_true",
        help="rotary cos/sin looked up in tables (cacheaug.rope) in every case, training and inference",
    )
    ap.add_argument(
        "--levers",
        default="",
        help="coprocessor levers for every case, e.g. "
        "'position_scheme=shared,reread_last=1,echo_residual=1,readout=pre_norm' (CoprocessorConfig fields)",
    )
    ap.add_argument(
        "--inits",
        nargs="+",
        default=["copy"],
        help="arms with latents checked on the tiny models (cacheaug.arms), e.g. copy lora scratch pause",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    args.trace_windows = args.trace_windows or args.trace_kernel
    levers = {}
    for item in filter(None, args.levers.split(",")):
        key, value = item.split("=")
        levers[key] = (
            bool(int(value))
            if key in ("reread_last", "echo_residual")
            else float(value)
            if key == "offset_decay"
            else value
        )
    torch._dynamo.config.recompile_limit = 256  # flex recompiles per new length; never fall back silently
    torch._dynamo.config.accumulated_recompile_limit = 4096
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "levers": levers,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cases": [],
    }
    g = torch.Generator().manual_seed(0)

    def record(row):
        print(json.dumps(row), flush=True)
        results["cases"].append(row)

    for backend in args.backends:
        for family in args.families:
            if backend == "sdpa" and attn_for(family) != "sdpa":
                continue  # refused by design: sdpa would change the model (Gemma-2's soft-capping)
            for init in args.inits:
                cfg = CoprocessorConfig(3, 5, 4, init=init, lora_rank=4, **levers)
                model = CacheAugmentedLM(tiny_model(family, backend, device=device), cfg)
                perturb_trainable(model)
                if args.rope_table:  # before the trace settings below (it sets them to their defaults)
                    apply_speed_options(model, rope_table=True)
                model.trace_chunk = args.trace_chunk
                if args.trace_windows:
                    if backend != "sdpa" or not model.family.dict_masks:
                        continue  # trace windows run sdpa with per-layer-type masks only (cacheaug.windows)
                    model.trace_windows = True
                    model.trace_kernel = args.trace_kernel
                ids = torch.randint(3, 128, (2, 40), generator=g).to(device)
                positions = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]], device=device)
                record(
                    {
                        "model": f"tiny-{family}",
                        "init": init,
                        "backend": backend,
                        "T": 40,
                        "trace_chunk": args.trace_chunk,
                        "trace_windows": args.trace_windows,
                        "trace_kernel": args.trace_kernel,
                        "rope_table": args.rope_table,
                        **check(model, ids, positions),
                    }
                )
        if args.real:
            fp32 = backend not in args.real_bf16_only
            dtype = torch.float32 if fp32 else torch.bfloat16
            base, tok = load_base_model(args.real, device=device, dtype=dtype, attn_implementation=backend)
            model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16, n_ahead=16, n_traces=8, **levers))
            if args.rope_table:  # before the trace settings below (it sets them to their defaults)
                apply_speed_options(model, rope_table=True)
            T = args.real_length
            ids = tok(builtin_text(), return_tensors="pt")["input_ids"][0, : 2 * T].view(2, T).to(device)
            positions = torch.stack([torch.linspace(0, T - 17, 8), torch.linspace(5, T - 40, 8)]).long().to(device)
            model.trace_groups, model.trace_chunk = args.trace_groups, args.trace_chunk
            model.trace_windows = args.trace_windows
            model.trace_kernel = args.trace_kernel
            groups = groups_fitting(positions, T, 16, args.trace_groups)
            if groups != args.trace_groups:
                raise SystemExit(
                    f"--trace-groups {args.trace_groups}: the fixed insertion points do not fit; use 1, 2 or 4"
                )
            row = {
                "model": args.real,
                "backend": backend,
                "T": T,
                "n_latents": 16,
                "n_ahead": 16,
                "n_traces": 8,
                "trace_groups": groups,
                "trace_chunk": args.trace_chunk,
                "trace_windows": args.trace_windows,
                "trace_kernel": args.trace_kernel,
                "rope_table": args.rope_table,
                **check(model, ids, positions, fp32),
            }
            if device.type == "cuda":
                row["train_step_bf16_autocast"] = train_step_check(model, ids)
            record(row)
            del model, base
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
