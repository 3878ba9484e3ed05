"""GPU diagnostic: do the parallel training pass and augment+decode agree on a TRAINED coprocessor, on held-out
text, in bf16 and fp32 (sdpa)? Prints mean losses and relative perplexity change per path and offset group."""

import json
import sys

import torch

from cacheaug import CacheAugmentedLM, load_base_model
from cacheaug.evaluate import autocast_for, continuation_losses, heldout_sequences

ckpt, out = sys.argv[1], sys.argv[2]
res = {}
for dtype in (torch.bfloat16, torch.float32):
    base, tok = load_base_model("gemma-3-270m", dtype=dtype, attn_implementation="sdpa")
    model = CacheAugmentedLM.from_pretrained(ckpt, base=base)
    if dtype == torch.float32:
        model.coprocessor.float()
    seqs = heldout_sequences(tok, ("default",), 1.0, 1024, 8).to(model.device)
    T, N_A = 1024, model.config.n_ahead
    pts = torch.linspace(T // 8, T - N_A - 1, 16).long()
    par, seq, basel = [], [], []
    with torch.no_grad(), autocast_for(model):
        for i in range(len(seqs)):
            o = model(seqs[i : i + 1], positions=pts[None], return_base_losses=True)
            par.append(o.token_losses[0].float().cpu())
            basel.append(o.base_token_losses[0].float().cpu())
            seq.append(
                torch.stack([continuation_losses(model, seqs[i : i + 1], int(p), N_A).float().cpu() for p in pts])
            )
    par, seq, basel = torch.stack(par), torch.stack(seq), torch.stack(basel)  # [N, K, N_A]
    rel = lambda x: [
        round(100 * (float(torch.exp(x[..., o].mean() - basel[..., o].mean())) - 1), 2) for o in (0, 1, 3, 7, 15)
    ]
    r = {
        "par_minus_seq_abs_mean": float((par - seq).abs().mean()),
        "par_minus_seq_abs_max": float((par - seq).abs().max()),
        "par_minus_seq_mean": float((par - seq).mean()),
        "rel_change_parallel": rel(par),
        "rel_change_augment": rel(seq),
    }
    res[str(dtype)] = r
    print(dtype, json.dumps(r), flush=True)
    del model, base
open(out, "w").write(json.dumps(res, indent=1))
