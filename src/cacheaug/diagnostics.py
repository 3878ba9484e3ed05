"""The insertion-cost diagnostic (``cacheaug eval insertion-cost``): what inserting fixed latents costs, no training.

A coprocessor starts from latents that the frozen decoder has never seen; before it can add information it
must climb out of the cost of inserting anything at all. This measures that floor: the perplexity change by
offset when N_L fixed latents are inserted after token p (the text after them teacher-forced, as in training),
for three kinds of latents:

* ``echo``: token p's own input embedding, repeated N_L times (a neutral start: the decoder has seen it there);
* ``pause``: untrained pause tokens (input embeddings of random vocabulary entries, context-free);
* ``coprocessor``: the untrained full-copy coprocessor (the paper's starting point).

Each runs through the same parallel pass as training and evaluation, on held-out documents of the training
sources and, with ``heldout_sources``, on unseen sources, under each requested position scheme and with or
without token p read again after the latents (``CoprocessorConfig.position_scheme``, ``reread_last``). Results are
keyed ``kind`` for the default levers, else ``kind@scheme`` / ``kind@scheme+reread``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import CoprocessorConfig
from .evaluate import bootstrap_rel_change, evaluation_sets, offset_loss_sums
from .model import CacheAugmentedLM

KINDS = ("echo", "pause", "coprocessor")


def fixed_latents_model(
    base, kind: str, n_latents: int, n_ahead: int, position_scheme: str = "shifted", reread_last: bool = False
) -> CacheAugmentedLM:
    if kind not in KINDS:
        raise ValueError(f"unknown latent kind {kind!r}: choose from {KINDS}")
    init = "copy" if kind == "coprocessor" else "pause"
    # echo: the untrained echo-residual start (token p's embedding + 0 x the pause tokens), the same at inference
    return CacheAugmentedLM(
        base,
        CoprocessorConfig(
            n_latents=n_latents,
            n_ahead=n_ahead,
            n_traces=1,
            init=init,
            position_scheme=position_scheme,
            reread_last=reread_last,
            echo_residual=kind == "echo",
        ),
    )


def setting_name(kind: str, scheme: str, reread: bool) -> str:
    if scheme == "shifted" and not reread:
        return kind
    return f"{kind}@{scheme}" + ("+reread" if reread else "")


def insertion_cost(
    *,
    model_name: str = "gemma-3-270m",
    data: tuple[str, ...] = ("default",),
    heldout_pct: float = 1.0,
    adapt_pct: float = 0.0,
    heldout_sources: tuple[str, ...] = (),
    kinds: tuple[str, ...] = KINDS,
    latents: tuple[int, ...] = (1, 4, 16, 64),
    offsets: tuple[int, ...] = (1, 2, 4, 8),
    schemes: tuple[str, ...] = ("shifted",),
    reread: tuple[bool, ...] = (False,),
    seq_len: int = 400,
    sequences: int = 24,
    points: int = 10,
    n_boot: int = 1000,
    device: str | None = None,
    out: str | None = None,
    base=None,
    tokenizer=None,
) -> dict:
    """Perplexity change by offset for every kind of fixed latents and N_L, in-source and on unseen sources.
    Insertion points: ``points`` evenly spaced from T/4 to the last one with ``max(offsets)`` targets after it."""
    from tqdm.auto import tqdm

    from .base import load_base_model
    from .data import Splits

    if base is None:
        base, tokenizer = load_base_model(model_name, device=device)
    splits = Splits(heldout_pct, adapt_pct, tuple(heldout_sources))
    sets, _ = evaluation_sets(tokenizer, data, splits, seq_len, sequences)
    n_ahead = max(offsets)
    positions = torch.linspace(seq_len // 4, seq_len - 1 - n_ahead, points).long()
    report = {
        "model": model_name,
        "data": list(data),
        **splits.key(),
        "seq_len": seq_len,
        "offsets": list(offsets),
        "positions": positions.tolist(),
        "sequences": {k: len(v) for k, v in sets.items()},
        "results": {},
    }
    jobs = [(k, s, r, n) for k in kinds for s in schemes for r in reread for n in latents]
    for kind, scheme, rr, n_latents in tqdm(jobs, desc="insertion cost", unit="setting"):
        model = fixed_latents_model(base, kind, n_latents, n_ahead, scheme, rr)
        name = setting_name(kind, scheme, rr)
        for split, seqs in sets.items():
            aug, frozen, n_points = offset_loss_sums(model, seqs, stride=1, positions=positions)
            stats = bootstrap_rel_change(aug, frozen, n_points, n_boot)
            report["results"].setdefault(split, {}).setdefault(name, {})[str(n_latents)] = {
                k: [v[o - 1] for o in offsets] for k, v in stats.items()
            }
        del model
    for split, by_kind in report["results"].items():
        print(
            f"\nInsertion cost, {split}: perplexity change vs the frozen decoder at offsets {list(offsets)} "
            f"({len(sets[split])} x {len(positions)} points)"
        )
        width = max(12, *(len(k) for k in by_kind))
        print(f"{'latents':<{width}} | " + " | ".join(f"{'N_L=' + str(n):>24}" for n in latents))
        for kind, by_n in by_kind.items():
            cells = ["/".join(f"{c:+.0f}" for c in by_n[str(n)]["change"]) for n in latents]
            print(f"{kind:<{width}} | " + " | ".join(f"{c:>24}" for c in cells))
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
