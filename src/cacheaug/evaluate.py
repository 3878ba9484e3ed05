"""Held-out evaluation: per-offset loss of the augmented model against the frozen decoder on the same tokens."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import CacheAugmentedLM


def autocast_for(model: torch.nn.Module):
    """bf16/fp16 autocast when the decoder's weights are in half precision (fp32 trainable master weights).
    ``model``: a :class:`CacheAugmentedLM` or a plain causal LM."""
    weight = getattr(model, "base", model).get_input_embeddings().weight
    if weight.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(weight.device.type, dtype=weight.dtype)
    return contextlib.nullcontext()


def heldout_losses(model: CacheAugmentedLM, seqs: torch.Tensor, n_points: int, batch: int = 4) -> dict:
    """Mean augmented and frozen loss per offset (lists of N_A floats) over about ``n_points`` evenly spaced
    insertion points per sequence of ``seqs`` ``[N, T]`` (the quick evaluation run during training)."""
    T, N_A = seqs.shape[1], model.config.n_ahead
    stride = max(1, (T - N_A - min(T // 8, T - 1 - N_A)) // n_points)
    aug, base, points = offset_loss_sums(model, seqs, stride, batch)
    n = len(seqs) * points
    return {"augmented": (aug.sum(0) / n).tolist(), "base": (base.sum(0) / n).tolist(), "n_points": n}


def relative_ppl_change(losses: dict) -> list[float]:
    """exp(mean augmented loss - mean base loss) - 1 per offset, in percent."""
    return [100 * (math.exp(a - b) - 1) for a, b in zip(losses["augmented"], losses["base"])]


# ------------------------------------------------------------------------------------ perplexity by offset
@torch.no_grad()
def offset_loss_sums(
    model: CacheAugmentedLM,
    seqs: torch.Tensor,
    stride: int,
    batch: int = 4,
    positions: torch.Tensor | None = None,
    with_gate: bool = False,
):
    """Per-sequence sums of augmented and frozen losses per offset, augmenting densely.

    Every ``stride``-th token from T/8 on is an insertion point (the paper augments after every token;
    ``stride=1`` does that), unless ``positions`` ``[K]`` names them. Returns ``(aug [N, N_A], base [N, N_A],
    points_per_sequence)`` in float64; ``with_gate`` (the model has a gate) adds the sums with the gate deciding at
    each point (its frozen losses where it does not fire) ``[N, N_A]`` and how often it fired per sequence ``[N]``.
    """
    T, N_A = seqs.shape[1], model.config.n_ahead
    if positions is None:
        positions = torch.arange(min(T // 8, T - 1 - N_A), T - N_A, stride)
    aug, base, gated, fires = [], [], [], []
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    with autocast_for(model):
        for i in tqdm(
            range(0, len(seqs), batch), desc="eval ppl", unit="batch", leave=False, disable=len(seqs) <= batch
        ):
            ids = seqs[i : i + batch].to(model.device)
            out = model(ids, positions=positions, return_base_losses=True)
            aug.append(out.token_losses.double().sum(1).cpu())  # [b, N_A]
            base.append(out.base_token_losses.double().sum(1).cpu())
            if with_gate:
                fire = model.gate_fires(model.gate_states(ids, positions))  # [b, K]
                pick = torch.where(fire[:, :, None], out.token_losses, out.base_token_losses)
                gated.append(pick.double().sum(1).cpu())
                fires.append(fire.double().sum(1).cpu())
    model.train(was_training)
    if with_gate:
        return torch.cat(aug), torch.cat(base), len(positions), torch.cat(gated), torch.cat(fires)
    return torch.cat(aug), torch.cat(base), len(positions)


def bootstrap_rel_change(
    aug: torch.Tensor, base: torch.Tensor, points: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Relative perplexity change per offset, exp(mean augmented loss - mean frozen loss) - 1, with a
    percentile bootstrap interval that resamples whole sequences (points within a sequence are correlated).

    ``aug``/``base``: ``[N, N_A]`` per-sequence loss sums over ``points`` insertion points each.
    Returns lists of N_A floats: ``change``, ``lo``, ``hi`` (percent), ``base_ppl`` and ``ppl``.
    """
    n = aug.shape[0]
    diff = (aug - base) / points  # [N, N_A] per-point mean difference of each sequence
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    boot = torch.expm1(diff[idx].mean(1))  # [n_boot, N_A]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype)
    lo, hi = torch.quantile(boot, q, dim=0)
    return {
        "change": (100 * torch.expm1(diff.mean(0))).tolist(),
        "lo": (100 * lo).tolist(),
        "hi": (100 * hi).tolist(),
        "base_ppl": torch.exp(base.sum(0) / (n * points)).tolist(),
        "ppl": torch.exp(aug.sum(0) / (n * points)).tolist(),
    }


def heldout_sequences(tokenizer, data, splits, seq_len: int, n: int, split: str = "heldout") -> torch.Tensor:
    """``n`` sequences ``[n, T]`` of a split of ``data`` that no run trains on (``heldout``: documents held out of
    the training sources; ``unseen``: the held-out sources), spread evenly over its stream
    (:meth:`PackedSequences.spread`). ``splits``: a :class:`~cacheaug.data.Splits` or the held-out percent."""
    from .data import PackedSequences, build_token_files, load_tokens, start_token

    token_dir = build_token_files(tokenizer, list(data), splits)
    tokens = load_tokens(token_dir, split)
    held = PackedSequences(tokens, seq_len, seed=0, bos_id=start_token(tokenizer)) if len(tokens) > seq_len else []
    if len(held) == 0:
        raise ValueError(empty_split_message(token_dir, split, seq_len))
    return held.spread(n)


def empty_split_message(token_dir, split: str, seq_len: int) -> str:
    """Why a split gives no sequence of ``seq_len`` tokens, from the token files' counts, and what to change."""
    meta = json.loads((Path(token_dir) / "meta.json").read_text())
    docs, tokens = meta.get(f"{split}_docs", 0), meta.get(f"{split}_tokens", 0)
    total = sum(meta.get(f"{s}_docs", 0) for s in ("train", "heldout", "adapt"))
    if split == "heldout" and docs == 0:
        return (
            f"the held-out split is empty: {total} document(s) in all, and --heldout-pct {meta.get('heldout_pct')} "
            f"holds out about {total * meta.get('heldout_pct', 1) / 100:.1f} of them: raise --heldout-pct (e.g. 10), "
            "or give more, smaller documents (a long .txt is cut at blank lines into documents)"
        )
    if split == "heldout":
        return (
            f"the held-out split has {docs} document(s), {tokens} tokens, fewer than one sequence of --seq-len "
            f"{seq_len}: raise --heldout-pct or lower --seq-len"
        )
    return (
        f"the {split} split has {docs} document(s), {tokens} tokens, fewer than one sequence of --seq-len {seq_len}: "
        "name larger sources in --heldout-sources or lower --seq-len"
    )


def evaluation_sets(
    tokenizer, data, splits, seq_len: int, n: int, balanced: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    """``{"heldout": [n, T]}`` and, when ``splits`` names held-out sources, ``"unseen": [n, T]`` as well; with
    ``balanced`` the in-source sequences come in equal shares from each source (:func:`balanced_sequences`), whose
    counts are returned beside (else ``None``)."""
    if balanced:
        held, counts = balanced_sequences(tokenizer, data, splits, seq_len, n)
        sets = {"heldout": held}
    else:
        sets, counts = {"heldout": heldout_sequences(tokenizer, data, splits, seq_len, n)}, None
    if splits.heldout_sources:
        sets["unseen"] = heldout_sequences(tokenizer, data, splits, seq_len, n, split="unseen")
    return sets, counts


def balanced_sequences(tokenizer, data, splits, seq_len: int, n: int) -> tuple[torch.Tensor, dict[str, int]]:
    """``n`` held-out sequences ``[n, T]`` in equal shares from each source of ``data`` (the unseen ones left out),
    each share spread over its source's part of the held-out stream (the token files record where each source's
    documents lie: one tokenisation serves training and this); a source with fewer held-out windows than its share
    gives all it has and the rest is shared among the others. Returns the sequences (source after source) and how
    many came from each source."""
    from .data import PackedSequences, build_token_files, load_tokens, start_token

    token_dir = build_token_files(tokenizer, list(data), splits)
    tokens = load_tokens(token_dir, "heldout")
    ranges = json.loads((Path(token_dir) / "meta.json").read_text())["heldout_ranges"]
    pools = {}
    for name, (start, end) in ranges.items():
        if end - start > seq_len:
            pools[name] = PackedSequences(tokens[start:end], seq_len, seed=0, bos_id=start_token(tokenizer))
    if not pools:
        raise ValueError(
            f"no source of {list(data)} holds a held-out sequence of --seq-len {seq_len}: raise --heldout-pct or "
            "lower --seq-len"
        )
    quota = dict.fromkeys(pools, 0)
    left = n
    while left > 0:
        open_ = [s for s in pools if quota[s] < len(pools[s])]
        if not open_:
            break
        share = max(1, left // len(open_))
        for s in open_:
            take = min(share, len(pools[s]) - quota[s], left)
            quota[s] += take
            left -= take
            if left == 0:
                break
    seqs = torch.cat([pools[s].spread(k) for s, k in quota.items() if k])
    return seqs, quota


def _print_table(offsets, columns: dict[str, dict], frozen_ppl: list[float] | None = None) -> None:
    """One row per offset: ``change% [lo, hi]`` for every column (bootstrap_rel_change results)."""
    head = f"{'offset':>6} | " + (f"{'frozen ppl':>10} | " if frozen_ppl else "")
    print(head + " | ".join(f"{name:>24}" for name in columns))
    for j, o in enumerate(offsets):
        cells = [f"{r['change'][j]:+6.2f}% [{r['lo'][j]:+.1f}, {r['hi'][j]:+.1f}]" for r in columns.values()]
        print(
            f"{o:>6} | " + (f"{frozen_ppl[j]:>10.2f} | " if frozen_ppl else "") + " | ".join(f"{c:>24}" for c in cells)
        )


def _run_name(ckpt: str) -> str:
    gate = ckpt.endswith(" + gate")
    path = Path(ckpt[: -len(" + gate")] if gate else ckpt)
    return (path.parent.name or str(path)) + (" + gate" if gate else "")


def evaluate_ppl(
    checkpoints: list[str],
    *,
    model_name: str = "gemma-3-270m",
    data: tuple[str, ...] = ("default",),
    heldout_pct: float = 1.0,
    adapt_pct: float = 0.0,
    heldout_sources: tuple[str, ...] = (),
    seq_len: int = 1024,
    sequences: int = 64,
    stride: int = 16,
    offsets: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    n_boot: int = 1000,
    device: str | None = None,
    out: str | None = None,
    base=None,
    tokenizer=None,
    balanced: bool = False,
    dtype: str | None = None,
) -> dict:
    """`cacheaug eval ppl`: held-out perplexity change by offset for each checkpoint (coprocessors and controls
    alike), against the frozen decoder on the same tokens, with 95% bootstrap intervals over sequences. With
    ``heldout_sources`` the same is reported on those unseen sources, side by side (``report["unseen"]``). With
    several checkpoints, each pair is also compared directly, paired on the same sequences (``report["paired"]``:
    the perplexity of the first relative to the second). ``balanced``: in-source sequences in equal shares per
    source; ``dtype``: the decoder's precision (``float32`` re-scores a bf16 result in full precision)."""
    import dataclasses
    import json
    from pathlib import Path

    from .base import load_base_model
    from .data import Splits

    if base is None:
        torch_dtype = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        base, tokenizer = load_base_model(model_name, device=device, dtype=torch_dtype)
    splits = Splits(heldout_pct, adapt_pct, tuple(heldout_sources))
    sets, per_source = evaluation_sets(tokenizer, data, splits, seq_len, sequences, balanced=balanced)
    n_ahead = max(offsets)
    report = {
        "model": model_name,
        "data": list(data),
        **splits.key(),
        "dtype": str(base.dtype).replace("torch.", ""),
        "seq_len": seq_len,
        "sequences": {k: len(v) for k, v in sets.items()},
        **({"sequences_per_source": per_source} if per_source else {}),
        "stride": stride,
        "offsets": list(offsets),
        "n_boot": n_boot,
        "runs": {},
    }
    kept: dict[str, dict[str, tuple[torch.Tensor, int]]] = {}  # per split and run: loss sums, for the pairs
    frozen_sums: dict[str, torch.Tensor] = {}
    for ckpt in checkpoints:
        model = CacheAugmentedLM.from_pretrained(ckpt, base=base)
        model.config = dataclasses.replace(model.config, n_ahead=n_ahead)  # N_A only sets which targets are scored
        gated = model.gated()
        for split, seqs in sets.items():
            sums = offset_loss_sums(model, seqs, stride, with_gate=gated)
            aug, frozen, points = sums[:3]
            kept.setdefault(split, {})[str(ckpt)] = (aug, points)
            frozen_sums[split] = frozen
            if gated:
                kept[split][f"{ckpt} + gate"] = (sums[3], points)
            stats = bootstrap_rel_change(aug, frozen, points, n_boot)
            pick = {k: [v[o - 1] for o in offsets] for k, v in stats.items()}
            run = {"init": model.config.init, "n_latents": model.config.n_latents, "points": points * len(seqs), **pick}
            report.setdefault(split, {})[str(ckpt)] = run
            if gated:  # the same coprocessor, inserted only where its gate fires
                stats = bootstrap_rel_change(sums[3], frozen, points, n_boot)
                run = {
                    **run,
                    **{k: [v[o - 1] for o in offsets] for k, v in stats.items()},
                    "gate": True,
                    "gate_fire_rate": 100 * sums[4].sum().item() / (points * len(seqs)),
                }
                report[split][f"{ckpt} + gate"] = run
        del model
    report["runs"] = report["heldout"]  # the in-source results under their old key
    for split, runs in kept.items():  # every pair of runs, paired on the same sequences
        pairs = paired_changes(runs, offsets, n_boot)
        if pairs:
            report.setdefault("paired", {})[split] = pairs
    report["loss_sums"] = {  # per sequence: what `cacheaug eval pair` pairs across separate reports
        split: {
            "sequences_sha256": sequences_digest(sets[split]),
            "points": next(iter(runs.values()))[1],
            "frozen": frozen_sums[split].tolist(),
            "runs": {name: sums.tolist() for name, (sums, _) in runs.items()},
        }
        for split, runs in kept.items()
    }
    for split, title in (
        ("heldout", "in-source held-out documents"),
        ("unseen", f"unseen sources {list(heldout_sources)}"),
    ):
        if split not in report:
            continue
        runs = report[split]
        first = next(iter(runs.values()))
        print(
            f"\nPerplexity change vs the frozen decoder on {title} ({len(sets[split])} sequences of {seq_len}, an "
            f"insertion every {stride} tokens, 95% bootstrap interval over sequences):"
        )
        _print_table(offsets, {_run_name(c): r for c, r in runs.items()}, frozen_ppl=first["base_ppl"])
        for c, r in runs.items():
            if "gate_fire_rate" in r:
                print(f"  the gate of {_run_name(c)} fired at {r['gate_fire_rate']:.2f}% of the insertion points")
        pairs = report.get("paired", {}).get(split, {})
        if pairs:
            print("Paired on the same sequences (perplexity of the first relative to the second):")
            _print_table(offsets, {" vs ".join(map(_run_name, k.split(" vs "))): r for k, r in pairs.items()})
    if per_source:
        print(f"In-source sequences per source: {per_source}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def paired_changes(runs: dict[str, tuple[torch.Tensor, int]], offsets, n_boot: int) -> dict:
    """Every pair of runs (``{name: (loss sums [N, N_A], points per sequence)}``, scored on the same sequences):
    the first's perplexity relative to the second's at each offset, with its 95% bootstrap interval."""
    names, pairs = list(runs), {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            stats = bootstrap_rel_change(runs[a][0], runs[b][0], runs[a][1], n_boot)
            pairs[f"{a} vs {b}"] = {k: [stats[k][o - 1] for o in offsets] for k in ("change", "lo", "hi")}
    return pairs


def sequences_digest(seqs: torch.Tensor) -> str:
    """SHA-256 of evaluation sequences' token ids: two reports scored the same tokens iff their digests agree."""
    import hashlib

    return hashlib.sha256(seqs.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


def pair_reports(
    paths: list[str], n_boot: int = 0, out: str | None = None, tolerance: float = 0.005, rebase: bool = False
) -> dict:
    """`cacheaug eval pair`: the runs of separate ``eval ppl`` reports compared directly, paired on the same
    sequences, as one report with every checkpoint would pair them (``report["paired"]``: the perplexity of the
    first relative to the second, 95% bootstrap interval over sequences). The reports must have scored the same
    tokens (same split options, ``--sequences``, ``--seq-len``, ``--stride``, ``--balanced``) with the same frozen
    decoder (its mean loss may differ by ``tolerance`` nats: kernels of another GPU); runs scored on different
    machines or days pair as if scored together. ``n_boot`` 0: the first report's. ``rebase``: reports of sibling
    decoders (the same recipe run again: another frozen loss) pair each run's change against its own report's frozen
    decoder, each run's loss sums moved by its frozen decoder's gap to the first report's, sequence by sequence."""
    import json
    from pathlib import Path

    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not an `eval ppl` report ({str(err).splitlines()[0]})") from None
        if "loss_sums" not in reports[-1]:
            raise ValueError(f"{path} holds no per-sequence loss sums: score it again with `cacheaug eval ppl --out`")
    first, n_boot = reports[0], n_boot or reports[0]["n_boot"]
    offsets = first["offsets"]
    result = {"reports": [str(p) for p in paths], "offsets": offsets, "n_boot": n_boot, "rebase": rebase, "paired": {}}
    for split, ref in first["loss_sums"].items():
        entries: dict[str, tuple[torch.Tensor, int]] = {}
        for path, rep in zip(paths, reports):
            sums = rep["loss_sums"].get(split)
            same = sums is not None and sums["sequences_sha256"] == ref["sequences_sha256"]
            if not same or (rep["offsets"], rep["stride"]) != (offsets, first["stride"]):
                raise ValueError(
                    f"{path} scored other {split} tokens than {paths[0]}: score both with the same --data, split "
                    "options, --sequences, --seq-len, --stride, --offsets and --balanced"
                )
            frozen, ref_frozen = (torch.tensor(x["frozen"], dtype=torch.float64) for x in (sums, ref))
            gap = ((frozen.sum(0) - ref_frozen.sum(0)).abs().max() / (len(frozen) * sums["points"])).item()
            if gap > tolerance and not rebase:
                raise ValueError(
                    f"{path}: the frozen decoder's mean loss on the same {split} tokens differs from {paths[0]}'s by "
                    f"{gap:.4f} nats (more than {tolerance}): the reports scored different decoders (--model; "
                    "--rebase pairs each run's change against its own report's frozen decoder)"
                )
            result.setdefault("frozen_gap", {}).setdefault(split, {})[str(path)] = gap
            for name, run in sums["runs"].items():
                run = torch.tensor(run, dtype=torch.float64)
                entries[name if name not in entries else f"{name} ({path})"] = (
                    run - frozen + ref_frozen if rebase else run,
                    sums["points"],
                )
        pairs = result["paired"][split] = paired_changes(entries, offsets, n_boot)
        if rebase:
            gaps = ", ".join(f"{g:.4f}" for g in result["frozen_gap"][split].values())
            print(f"\n{split}: each run against its own report's frozen decoder (mean loss gaps to the first: {gaps})")
        print(f"\nPaired on the same {split} sequences (perplexity of the first relative to the second):")
        _print_table(offsets, {" vs ".join(map(_run_name, k.split(" vs "))): r for k, r in pairs.items()})
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ staleness
@torch.no_grad()
def continuation_losses(model: CacheAugmentedLM, ids: torch.Tensor, p: int, n_ahead: int, stale_by: int = 0):
    """Losses ``[n_ahead]`` (float32) of tokens p+1..p+n_ahead of ``ids`` ``[1, T]`` after augmenting at p with
    latents computed ``stale_by`` tokens earlier, through ``augment`` and plain decoding by the frozen model."""
    aug = model.augment(ids[:, : p + 1], stale_by=stale_by)
    logits = [aug.logits]
    if n_ahead > 1:
        text = ids[:, p + 1 : p + n_ahead]  # plain decoding, the first at the position the augmented cache gives it
        pos = torch.arange(aug.next_position, aug.next_position + text.shape[1], device=ids.device)[None]
        logits.append(model.base(input_ids=text, position_ids=pos, **model.cache_kwargs(aug.cache)).logits[0])
    return F.cross_entropy(torch.cat(logits).float(), ids[0, p + 1 : p + n_ahead + 1], reduction="none")


@torch.no_grad()
def staleness_sums(model: CacheAugmentedLM, seqs: torch.Tensor, delays: list[int], n_points: int, n_ahead: int):
    """Per-sequence loss sums ``{d: [N, n_ahead]}`` with latents d tokens stale, and the frozen sums ``[N, n_ahead]``.

    The insertion points are the same for every delay (from max(T/8, max delay) on), so the frozen reference is
    shared and the delays compare like for like."""
    T = seqs.shape[1]
    positions = torch.linspace(max(T // 8, max(delays)), T - 1 - n_ahead, n_points).long().tolist()
    out = {d: torch.zeros(len(seqs), n_ahead, dtype=torch.float64) for d in delays}
    frozen = torch.zeros(len(seqs), n_ahead, dtype=torch.float64)
    from tqdm.auto import tqdm

    with autocast_for(model):
        for i, seq in enumerate(tqdm(seqs, desc="eval stale", unit="seq", leave=False)):
            ids = seq[None].to(model.device)
            logits = model.base(input_ids=ids).logits[0].float()
            nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
            for p in positions:
                frozen[i] += nll[p : p + n_ahead].double().cpu()
                for d in delays:
                    out[d][i] += continuation_losses(model, ids, p, n_ahead, d).double().cpu()
    return out, frozen, len(positions)


def evaluate_staleness(
    checkpoint: str,
    *,
    delays=(0, 4, 16, 64),
    offsets=(1, 2, 4, 8, 16),
    sequences: int = 16,
    points: int = 16,
    seq_len: int = 1024,
    model_name: str = "gemma-3-270m",
    data=("default",),
    heldout_pct: float = 1.0,
    n_boot: int = 1000,
    device=None,
    out=None,
    base=None,
    tokenizer=None,
):
    """`cacheaug eval stale`: how much of the gain survives when latents computed at p are inserted d tokens later."""
    import json
    from pathlib import Path

    from .base import load_base_model

    if base is None:
        base, tokenizer = load_base_model(model_name, device=device)
    seqs = heldout_sequences(tokenizer, data, heldout_pct, seq_len, sequences)
    model = CacheAugmentedLM.from_pretrained(checkpoint, base=base)
    sums, frozen, n_points = staleness_sums(model, seqs, list(delays), points, max(offsets))
    report = {
        "checkpoint": str(checkpoint),
        "delays": list(delays),
        "offsets": list(offsets),
        "sequences": len(seqs),
        "points_per_sequence": n_points,
        "seq_len": seq_len,
        "by_delay": {},
    }
    for d in delays:
        stats = bootstrap_rel_change(sums[d], frozen, n_points, n_boot)
        report["by_delay"][str(d)] = {k: [v[o - 1] for o in offsets] for k, v in stats.items()}
    print(f"\nPerplexity change vs frozen when the latents are d tokens stale ({len(seqs)} x {n_points} points):")
    _print_table(offsets, {f"d={d}": r for d, r in report["by_delay"].items()})
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
