"""`cacheaug demo`: the whole core, end to end, on the offline default model in a few CPU minutes.

It trains a small coprocessor and, with the same data and budget, the pause-token control, then reports the
held-out relative perplexity change by offset for both against the frozen model, saves and reloads the
checkpoint (checking the logits are identical) and decodes a prompt with and without augmentation.

The text is the documentation of a fixed set of Python standard-library modules (English prose that every
Python install carries), so the demo needs no data download. It is a smoke run of the machinery: a few
dozen steps on ~20k tokens adapt the model to this text domain, which is why the pause-token control is
reported beside it (shared/measurements.md: on unseen text any trained prefix gains). Real training and
evaluation on the default corpus: `cacheaug train` / `cacheaug eval` (docs/results.md).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import GEMMA_3_270M, load_base_model
from .config import CoprocessorConfig
from .model import CacheAugmentedLM

DOC_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing", "unittest",
    "email.message", "http.client", "functools", "itertools", "threading", "asyncio.tasks", "decimal",
    "datetime", "re", "string", "textwrap", "contextlib",
)  # fmt: skip


def builtin_text() -> str:
    """About 110k characters of English documentation from the Python standard library."""
    docs = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        docs.append(inspect.getdoc(mod) or "")
        for key, obj in sorted(vars(mod).items()):
            if key.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


def _sequences(tokenizer, text: str, length: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


@torch.no_grad()
def heldout_losses(model: CacheAugmentedLM, seqs: torch.Tensor, n_points: int, batch: int = 4) -> dict:
    """Mean augmented and base loss per offset over evenly spaced insertion points of every sequence."""
    T, N_A = seqs.shape[1], model.config.n_ahead
    positions = torch.linspace(0, T - 1 - N_A, n_points).long()
    aug, base = torch.zeros(N_A), torch.zeros(N_A)
    for i in range(0, len(seqs), batch):
        out = model(seqs[i : i + batch].to(model.device), positions=positions, return_base_losses=True)
        aug += out.token_losses.sum((0, 1)).cpu()
        base += out.base_token_losses.sum((0, 1)).cpu()
    n = len(seqs) * n_points
    return {"augmented": (aug / n).tolist(), "base": (base / n).tolist()}


def relative_ppl_change(losses: dict) -> list[float]:
    """exp(mean augmented loss - mean base loss) - 1 per offset, in percent."""
    return [100 * (math.exp(a - b) - 1) for a, b in zip(losses["augmented"], losses["base"])]


def train_briefly(model: CacheAugmentedLM, seqs: torch.Tensor, steps: int, batch: int, lr: float, desc: str) -> list:
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    curve = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        rows = torch.randint(len(seqs), (batch,), generator=g)
        out = model(seqs[rows].to(model.device), generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        opt.step()
        curve.append(out.loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    model.eval()
    return curve


def run_demo(
    model_name: str = GEMMA_3_270M,
    steps: int = 30,
    seq_len: int = 256,
    batch: int = 2,
    n_latents: int = 8,
    n_ahead: int = 8,
    n_traces: int = 8,
    lr: float = 1e-4,
    out_dir: str | Path = "runs/demo",
    device: str | None = None,
) -> dict:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    base, tok = load_base_model(model_name, device=device)
    print(f"loaded {model_name} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, "
          f"{base.config._attn_implementation}, {next(base.parameters()).dtype}) on {base.device}")
    seqs = _sequences(tok, builtin_text(), seq_len)
    n_held = max(2, len(seqs) // 8)
    train, held = seqs[:-n_held], seqs[-n_held:]
    print(f"text: {seqs.numel()} tokens of Python standard-library docs -> {len(train)} train / {len(held)} held-out "
          f"sequences of {seq_len}")

    report = {"model": model_name, "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr,
              "n_latents": n_latents, "n_ahead": n_ahead, "n_traces": n_traces, "runs": {}}
    for kind in ("copy", "pause"):
        label = "coprocessor" if kind == "copy" else "pause tokens (control)"
        model = CacheAugmentedLM(base, CoprocessorConfig(n_latents, n_ahead, n_traces, init=kind))
        curve = train_briefly(model, train, steps, batch, lr, desc=f"train {label}")
        losses = heldout_losses(model, held, n_points=n_traces)
        report["runs"][kind] = {"train_loss": curve, "heldout": losses, "rel_ppl_change_pct": relative_ppl_change(losses)}
        if kind == "copy":
            ckpt = model.save_pretrained(out_dir / "coprocessor")
            prompt = held[:1, :48].to(model.device)
            reloaded = CacheAugmentedLM.from_pretrained(ckpt, base=base)
            same = torch.equal(reloaded.augment(prompt).logits, model.augment(prompt).logits)
            if not same:
                raise RuntimeError("reloaded coprocessor gives different logits")
            plain = model.generate(prompt, 24, augment=False)[0, 48:]
            augmented = model.generate(prompt, 24)[0, 48:]
            report["sample"] = {"prompt": tok.decode(prompt[0]), "base": tok.decode(plain), "augmented": tok.decode(augmented)}
            print(f"saved {ckpt}; reloaded logits identical: {same}")
        del model

    cop, pause = report["runs"]["copy"]["rel_ppl_change_pct"], report["runs"]["pause"]["rel_ppl_change_pct"]
    print(f"\nHeld-out perplexity change vs the frozen model, by offset after the insertion point "
          f"({len(held)} sequences x {n_traces} points, after {steps} steps):")
    print(f"{'offset':>6} | {'base ppl':>8} | {'pause tokens':>12} | {'coprocessor':>11} | {'margin':>7}")
    for o in range(n_ahead):
        base_ppl = math.exp(report["runs"]["copy"]["heldout"]["base"][o])
        print(f"{o + 1:>6} | {base_ppl:>8.2f} | {pause[o]:>+11.2f}% | {cop[o]:>+10.2f}% | {cop[o] - pause[o]:>+6.2f}")
    print("\nA few CPU steps on one small text domain: the pause-token control shows how much is plain domain "
          "adaptation; only the margin is the coprocessor's own. GPU-scale results: docs/results.md.")
    print(f"\nprompt:    ...{report['sample']['prompt'][-120:]!r}\nbase:      {report['sample']['base']!r}\n"
          f"augmented: {report['sample']['augmented']!r}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_dir / 'demo.json'} ({report['seconds']} s)")
    return report
