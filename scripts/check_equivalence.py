"""Check parallel training pass == augment + plain decoding, trace by trace, on any device / dtype / backend.

CPU (fp32) is covered by the test suite; this script is for the GPU in bf16 with flex_attention and sdpa:

    python scripts/check_equivalence.py --device cuda --dtype bfloat16 --backends flex_attention sdpa \
        --real gemma-3-270m --out equivalence.json

For every case it reports
  * ``max_err``: largest |training-pass loss - reference loss| over all traces and offsets;
  * ``noise_floor``: the same statistic between two ways the *unmodified* base model computes the same losses
    (one full forward vs prefix cache + incremental decoding), i.e. what the dtype/kernels alone give;
  * ``gain``: largest |augmented - base| loss, so a reader can see the latents matter at all.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cacheaug import CacheAugmentedLM, CoprocessorConfig, load_base_model
from cacheaug.testing import FAMILIES, max_trace_error, perturb_trainable, tiny_model


@torch.no_grad()
def noise_floor(model, ids, positions) -> float:
    """max |full-forward loss - incremental-decoding loss| of the base model alone at the traced targets."""
    n_ahead = model.config.n_ahead
    kw = model.family.cache_kwarg
    full = model.base(input_ids=ids).logits.float()
    worst = 0.0
    for b in range(ids.shape[0]):
        for p in positions[b].tolist():
            cache = DynamicCache()
            first = model.base(input_ids=ids[b : b + 1, : p + 1], logits_to_keep=1, **{kw: cache}).logits[:, -1]
            rest = model.base(input_ids=ids[b : b + 1, p + 1 : p + n_ahead], **{kw: cache}).logits[0]
            inc = torch.cat([first, rest]).float()
            tgt = ids[b, p + 1 : p + n_ahead + 1]
            a = F.cross_entropy(full[b, p : p + n_ahead], tgt, reduction="none")
            worst = max(worst, (a - F.cross_entropy(inc, tgt, reduction="none")).abs().max().item())
    return worst


def real_text_ids(tokenizer, length: int, batch: int, device) -> torch.Tensor:
    """Real English text available on any Python install: CPython's LICENSE.txt."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    ids = tokenizer(path.read_text(), return_tensors="pt")["input_ids"][0]
    if ids.numel() < batch * length:
        raise RuntimeError(f"{path} gives {ids.numel()} tokens, need {batch * length}")
    return ids[: batch * length].view(batch, length).to(device)


def check(model, ids, positions) -> dict:
    t0 = time.perf_counter()
    err, out = max_trace_error(model, ids, positions)
    return {
        "max_err": err,
        "noise_floor": noise_floor(model, ids, positions),
        "gain": (out.token_losses - out.base_token_losses).abs().max().item(),
        "mean_loss": out.token_losses.mean().item(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train_step_check(model, ids, dtype) -> dict:
    """One optimizer step with fp32 master weights under autocast: finite loss, gradients, unchanged base."""
    model.coprocessor.float()
    before = {n: t.clone() for n, t in list(model.base.state_dict().items())[:4]}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    with torch.autocast(ids.device.type, dtype=dtype):
        out = model(ids)
    out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    opt.step()
    return {
        "loss": out.loss.item(),
        "grads_finite": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "base_unchanged": all(torch.equal(model.base.state_dict()[n], t) for n, t in before.items()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backends", nargs="+", default=["flex_attention", "sdpa"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--real", default=None, help="also check a real model, e.g. gemma-3-270m")
    ap.add_argument("--real-length", type=int, default=512)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 256  # flex recompiles per new length; never fall back silently
    torch._dynamo.config.accumulated_recompile_limit = 4096
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
               "torch": torch.__version__, "transformers": __import__("transformers").__version__, "cases": []}
    g = torch.Generator().manual_seed(0)
    for backend in args.backends:
        for family in args.families:
            if family == "gemma2" and backend == "sdpa":
                continue  # refused by design: sdpa drops Gemma-2's soft-capping
            base = tiny_model(family, backend, dtype=dtype, device=device)
            model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4))
            perturb_trainable(model)
            ids = torch.randint(3, 128, (2, 40), generator=g).to(device)
            positions = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]], device=device)
            row = {"model": f"tiny-{family}", "backend": backend, **check(model, ids, positions)}
            print(json.dumps(row), flush=True)
            results["cases"].append(row)
        if args.real:
            base, tok = load_base_model(args.real, device=device, dtype=dtype, attn_implementation=backend)
            model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16, n_ahead=16, n_traces=8))
            perturb_trainable(model, scale=0.01)
            T = args.real_length
            ids = real_text_ids(tok, T, 2, device)
            positions = torch.stack([torch.linspace(0, T - 17, 8).long(), torch.linspace(5, T - 40, 8).long()]).to(device)
            row = {"model": args.real, "backend": backend, "T": T, "n_latents": 16, "n_ahead": 16, "n_traces": 8,
                   **check(model, ids, positions)}
            if device.type == "cuda":
                row["train_step"] = train_step_check(model, ids, dtype)
            print(json.dumps(row), flush=True)
            results["cases"].append(row)
            del model, base
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
