"""`cacheaug train-gate`: score positions of a corpus with and without latents, fit the gate (cacheaug.gate) and
save it into the checkpoint folder."""

from __future__ import annotations

import dataclasses

import torch

from .gate import GATE_CONFIG, GATE_WEIGHTS, fit, outcome


@torch.no_grad()
def collect(model, seqs: torch.Tensor, positions: torch.Tensor, batch: int = 8, progress: bool = True):
    """What augmenting did at ``positions`` ``[N, K]`` of ``seqs`` ``[N, T]``: the frozen decoder's hidden states there
    ``[N, K, D]`` (float32) and the change in the mean loss of the next N_A tokens, augmented minus frozen ``[N, K]``
    (one parallel pass per batch)."""
    from tqdm.auto import tqdm

    from .evaluate import autocast_for

    states, deltas = [], []
    was_training = model.training
    model.eval()
    with autocast_for(model):
        for i in tqdm(
            range(0, len(seqs), batch),
            desc="train-gate: scoring positions",
            unit="batch",
            leave=False,
            disable=not progress,
        ):
            ids, pos = seqs[i : i + batch].to(model.device), positions[i : i + batch].to(model.device)
            scores = model.score_targets(ids, pos)
            deltas.append((scores["losses"] - scores["base_losses"]).double().mean(-1).cpu())
            states.append(model.gate_states(ids, pos).float().cpu())
    model.train(was_training)
    return torch.cat(states), torch.cat(deltas)


def train_gate(
    checkpoint: str,
    data: tuple[str, ...],
    *,
    model_name: str | None = None,
    seq_len: int = 256,
    sequences: int = 1024,
    n_traces: int = 16,
    marker: str = " Answer:",
    margin: float = 0.0,
    threshold: float = 0.5,
    batch: int = 8,
    heldout_pct: float = 1.0,
    validation: float = 0.2,
    seed: int = 0,
    device: str | None = None,
    base=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """``cacheaug train-gate``: score ``sequences`` training sequences of ``data`` at ``n_traces`` positions each (the
    ends of ``marker``, filled up with uniform points), fit the gate on the first ``1 - validation`` of them, report
    it on the rest, and save it into the checkpoint folder. Returns the report."""
    from .base import load_base_model
    from .checkpoint import resolve_checkpoint
    from .data import Splits
    from .evaluate import heldout_sequences
    from .model import CacheAugmentedLM
    from .synth import marker_positions
    from .synth_eval import base_model_of

    path = resolve_checkpoint(checkpoint)
    if base is None:
        base, tokenizer = load_base_model(model_name or base_model_of([str(path)]), device=device)
    model = CacheAugmentedLM.from_pretrained(path, base=base)
    if not model.arm.has_latents:
        raise ValueError(
            f"{path} is a {model.config.init!r} checkpoint, which inserts nothing: a gate has nothing to decide there"
        )
    n_ahead = model.config.n_ahead
    if seq_len < n_ahead + 2:
        raise ValueError(f"--seq-len {seq_len} leaves no insertion point before {n_ahead} target tokens")
    seqs = heldout_sequences(tokenizer, data, Splits(heldout_pct), seq_len, sequences, split="train")
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    g = torch.Generator().manual_seed(seed)
    k = min(n_traces, seq_len - n_ahead)
    positions = torch.stack([marker_positions(s, marker_ids, seq_len - n_ahead, k, g) for s in seqs])
    states, deltas = collect(model, seqs, positions, batch, progress)
    n_fit = max(1, round(len(seqs) * (1 - validation))) if len(seqs) > 1 else 1
    gate = fit(states[:n_fit], deltas[:n_fit], margin=margin, threshold=threshold, n_ahead=n_ahead)
    at_marker = torch.zeros_like(deltas, dtype=torch.bool)
    if marker_ids:
        m = len(marker_ids)
        for i, s in enumerate(seqs):
            for j, p in enumerate(positions[i].tolist()):
                at_marker[i, j] = p + 1 >= m and s[p + 1 - m : p + 1].tolist() == marker_ids
    report = {
        "checkpoint": str(path),
        "data": list(data),
        "sequences": len(seqs),
        "seq_len": seq_len,
        "positions_per_sequence": k,
        "marker": marker,
        "margin": margin,
        "threshold": threshold,
        "fit_sequences": n_fit,
    }
    val = slice(n_fit, None) if n_fit < len(seqs) else slice(0, None)
    report["validation"] = outcome(gate, states[val], deltas[val])
    for name, where in (("at_marker", at_marker[val]), ("elsewhere", ~at_marker[val])):
        if where.any():
            report["validation"][name] = outcome(gate, states[val][where], deltas[val][where])
    gate.config = dataclasses.replace(gate.config, fit=report)
    gate.save(path)
    _print_report(report)
    print(f"cacheaug train-gate: gate saved in {path} ({GATE_CONFIG}, {GATE_WEIGHTS})")
    return report


def _print_report(report: dict) -> None:
    v = report["validation"]
    print(
        f"train-gate: fitted on {report['fit_sequences']} of {report['sequences']} sequences "
        f"({report['positions_per_sequence']} positions each); on the other positions:"
    )
    rows = [("all", v)] + [(k, v[k]) for k in ("at_marker", "elsewhere") if k in v]
    print(
        f"  {'positions':>10} {'n':>7} {'fires':>7} {'precision':>9} {'loss change: gated':>19} {'always':>8} "
        f"{'oracle':>8}"
    )
    for name, r in rows:
        print(
            f"  {name:>10} {r['positions']:>7} {100 * r['fire_rate']:>6.1f}% {100 * r['precision']:>8.1f}% "
            f"{r['loss_change_gated']:>19.4f} {r['loss_change_always']:>8.4f} {r['loss_change_oracle']:>8.4f}"
        )
