"""Perplexity change at offset 1 against traces seen, on the adapted frozen decoder (experiments/levers.sh).

    python experiments/plot_levers.py --results results/levers --out docs/levers_offset1_curve.png
    python experiments/plot_levers.py --results results/levers_long --out docs/levers_long_curve.png \
        --title "Adapted frozen Gemma 3 270M, long runs: shared + echo + reread, N_L=16"
    python experiments/plot_levers.py --results results/levers_reg results/levers_long --shape reg-k128=8x128 \
        reg-pause=8x128 --out docs/levers_reg_curve.png --title "Adapted frozen Gemma 3 270M: K=128, LoRA, long runs"

Reads every ``ppl_*.json`` (one entry per checkpoint, in-source held-out and unseen), writes ``curves.json`` beside
them (arm, step, traces seen, change at every offset with its 95% bootstrap interval, and for every arm with three
or more checkpoints a least-squares line of the offset-1 change against log10(traces) with the traces where it would
cross zero), and one figure: offset-1 change against traces, in-source and unseen. Several result folders can be
drawn together (`curves.json` goes into the first); ``--shape ARM=BxK`` gives an arm's batch and traces per sequence
when they differ from levers.sh's 32 x 16 (sequences of 1,024 tokens: ``tokens`` counts the text seen).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

BATCH, TRACES, SEQ = 32, 16, 1024  # per step, as in levers.sh


def curves(results: list[Path], shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    shapes = shapes or {}
    out: dict = {"batch": BATCH, "traces_per_sequence": TRACES, "shapes": shapes, "arms": {}}
    for f in sorted(f for folder in results for f in folder.glob("ppl_*.json")):
        report = json.loads(f.read_text())
        out["offsets"] = report["offsets"]
        for split in ("heldout", "unseen"):
            for ckpt, run in report.get(split, {}).items():
                arm = Path(ckpt).parent.name.removeprefix("l_")
                step = int(re.search(r"step_(\d+)", ckpt).group(1))
                batch, traces = shapes.get(arm, (BATCH, TRACES))
                point = {
                    "step": step,
                    "traces": step * batch * traces,
                    "tokens": step * batch * SEQ,
                    "change": run["change"],
                    "lo": run["lo"],
                    "hi": run["hi"],
                }
                out["arms"].setdefault(arm, {}).setdefault(split, []).append(point)
    for arm in out["arms"].values():
        for split, points in list(arm.items()):
            points.sort(key=lambda p: p["step"])
            if len(points) >= 3:
                arm[f"{split}_fit"] = fit(points)
    return out


def fit(points: list[dict]) -> dict:
    """Least squares of the offset-1 change (percent) on log10(traces); where the line crosses zero."""
    xs = [math.log10(p["traces"]) for p in points]
    ys = [p["change"][0] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    cross = 10 ** (-intercept / slope) if slope < 0 else None
    return {"slope_pct_per_decade": slope, "intercept": intercept, "zero_at_traces": cross}


def plot(data: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, split, panel in zip(axes, ("heldout", "unseen"), ("in-source held-out", "unseen source (sotu)")):
        for name, arm in sorted(data["arms"].items()):
            points = arm.get(split, [])
            if not points:
                continue
            x = [p["traces"] for p in points]
            y = [p["change"][0] for p in points]
            err = [[p["change"][0] - p["lo"][0] for p in points], [p["hi"][0] - p["change"][0] for p in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, linestyle="-" if len(x) > 1 else "none")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("traces seen (insertion points trained on)")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity change at offset 1 (%)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=["results/levers"])
    ap.add_argument(
        "--shape",
        nargs="*",
        default=[],
        metavar="ARM=BxK",
        help="an arm's sequences per step and traces per sequence, e.g. reg-k128=8x128 (default 32x16)",
    )
    ap.add_argument("--out", default="docs/levers_offset1_curve.png")
    ap.add_argument("--title", default="Adapted frozen Gemma 3 270M: offset-1 change vs traces, N_L=16 unless named")
    args = ap.parse_args()
    shapes = {}
    for item in args.shape:
        arm, _, shape = item.partition("=")
        batch, _, traces = shape.partition("x")
        if not (arm and batch.isdigit() and traces.isdigit()):
            raise SystemExit(f"--shape {item!r}: expected ARM=BxK, e.g. reg-k128=8x128")
        shapes[arm] = (int(batch), int(traces))
    data = curves([Path(r) for r in args.results], shapes)
    (Path(args.results[0]) / "curves.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, Path(args.out), args.title)
    for name, arm in data["arms"].items():
        for key in ("heldout_fit", "unseen_fit"):
            if key in arm:
                print(name, key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in arm[key].items()})


if __name__ == "__main__":
    main()
