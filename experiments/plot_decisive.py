"""The decisive run's figure: the offset-1 perplexity change against traces for both arms.

    python experiments/plot_decisive.py --metrics results/decisive/metrics_d_pause_session31.jsonl \
        results/decisive/metrics_d_copro_*.jsonl --ppl results/decisive/ppl_pause_session32.json \
        results/decisive/ppl_copro.json --out docs/decisive_offset1.png

The curves are the in-training checks (``--eval-every``: 32 in-source sequences, offset 1, no interval); the points
with bars, when ``--ppl`` gives the rule's evaluation (``cacheaug eval ppl --out``, one report per session), are its
in-source and unseen changes at offset 1 with their 95% intervals, placed at each checkpoint's traces (its step from
the ``step_NNNNNN`` name or ``--steps``, times batch size times K).
Traces = text tokens x K / T (``--traces`` K, ``--seq-len`` T: the run's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.transforms import offset_copy

LABELS = {"d_pause": "pause tokens (16)", "d_copro": "coprocessor (full copy, 16 latents)"}


def arm_of(path: str) -> str:
    """``metrics_d_pause_session31.jsonl`` or ``.../d_copro_at_2300/step_002300`` -> ``d_pause`` / ``d_copro``."""
    name = Path(path).name if Path(path).suffix == ".jsonl" else Path(path).parent.name
    return next((arm for arm in LABELS if arm in name), name)


def curve(path: str, per_token: float) -> tuple[list[float], list[float]]:
    """(traces, offset-1 change in %) of every in-training evaluation in a metrics.jsonl, by step (a resumed run's
    repeated steps keep their last line)."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "eval_rel_ppl_offset_1" in row:
            by_step[row["step"]] = (row["tokens"] * per_token, row["eval_rel_ppl_offset_1"])
    points = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in points], [p[1] for p in points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", nargs="+", required=True, help="metrics.jsonl of the arms (several per arm: merged)")
    ap.add_argument("--ppl", nargs="*", default=[], help="the rule's evaluation (eval ppl --out JSON; one per session)")
    ap.add_argument("--steps", nargs="*", default=[], help="CHECKPOINT=STEP for --ppl runs (default: from the name)")
    ap.add_argument("--traces", type=int, default=128, help="K, insertion points per sequence")
    ap.add_argument("--seq-len", type=int, default=1024, help="T, tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (for --ppl checkpoints' traces)")
    ap.add_argument("--out", default="docs/decisive_offset1.png")
    args = ap.parse_args()
    per_token = args.traces / args.seq_len

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"d_pause": "tab:gray", "d_copro": "tab:blue"}
    merged: dict[str, list[tuple[float, float]]] = {}
    for path in args.metrics:
        xs, ys = curve(path, per_token)
        merged.setdefault(arm_of(path), []).extend(zip(xs, ys))
    for arm, points in merged.items():
        points = sorted(dict(points).items())
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "o-",
            ms=3,
            color=colors.get(arm),
            label=f"{LABELS.get(arm, arm)}: in-training check",
        )
    given = dict(s.split("=", 1) for s in args.steps)
    # Points at the same traces (both arms at step 2,300) are dodged sideways by a few points: arm, then split.
    ys = [y for points in merged.values() for _, y in points]
    bottom, top = min(ys, default=0.0), max(ys, default=0.0)
    dodge = {("d_pause", "heldout"): -9, ("d_pause", "unseen"): -3, ("d_copro", "heldout"): 3, ("d_copro", "unseen"): 9}
    for report in (json.loads(Path(path).read_text()) for path in args.ppl):
        for split, marker in (("heldout", "s"), ("unseen", "^")):
            for ckpt, run in report.get(split, {}).items():
                step = int(given.get(ckpt, Path(ckpt).name.removeprefix("step_") or 0))
                x = step * args.batch_size * args.traces
                c, lo, hi = run["change"][0], run["lo"][0], run["hi"][0]
                bottom, top = min(bottom, lo), max(top, hi)
                shift = offset_copy(ax.transData, fig=fig, x=dodge.get((arm_of(ckpt), split), 0), units="points")
                ax.errorbar(
                    [x],
                    [c],
                    yerr=[[c - lo], [hi - c]],
                    fmt=marker,
                    ms=6,
                    capsize=3,
                    color=colors.get(arm_of(ckpt)),
                    transform=shift,
                )
    if args.ppl:
        for split, marker in (("in-source", "s"), ("unseen source", "^")):
            ax.errorbar(
                [], [], yerr=[], fmt=marker, color="black", capsize=3, label=f"rule's evaluation, {split} (95%)"
            )
    ax.set_ylim(min(0.0, bottom) - 0.2, max(0.0, top) + 0.3)  # dodged points do not widen the axes themselves
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("traces")
    ax.set_ylabel("perplexity change at offset 1 (%)")
    ax.set_title("The decisive run: Gemma 3 270M adapted, broad corpus, K=128")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"plot_decisive: wrote {args.out}")


if __name__ == "__main__":
    main()
