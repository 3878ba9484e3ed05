"""Exact match against traces seen for every arm of the equal-budget mechanism test (experiments/mechanism_budget.sh).

    python experiments/plot_mechanism.py --results results/mechanism_budget --out docs/mechanism_em_curve.png

Reads every ``synth_eval_*.json`` (one entry per checkpoint), writes ``curves.json`` beside them (arm, step, traces
seen, exact match with its 95% Wilson interval, overall and by family) and one figure: overall and per family.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BATCH, TRACES = 32, 16  # per step, as in mechanism_budget.sh


def curves(results: Path) -> dict:
    out: dict = {}
    frozen = None
    for f in sorted(results.glob("synth_eval_*.json")):
        report = json.loads(f.read_text())
        for name, arm in report["arms"].items():
            if name == "frozen":
                frozen = arm
                continue
            run = Path(arm["checkpoint"]).parent.name.removeprefix("b_")
            step = int(re.search(r"step_(\d+)", arm["checkpoint"]).group(1))
            point = {
                "step": step,
                "traces": step * BATCH * TRACES,
                "overall": {k: arm["overall"][k] for k in ("em", "em_lo", "em_hi")},
                "by_family": {fam: {k: v[k] for k in ("em", "em_lo", "em_hi")} for fam, v in arm["by_family"].items()},
            }
            out.setdefault(run, {})[step] = point
    arms = {run: [pts[s] for s in sorted(pts)] for run, pts in sorted(out.items())}
    base = {
        "overall": {k: frozen["overall"][k] for k in ("em", "em_lo", "em_hi")},
        "by_family": {fam: {k: v[k] for k in ("em", "em_lo", "em_hi")} for fam, v in frozen["by_family"].items()},
    }
    return {"frozen": base, "arms": arms}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *data["frozen"]["by_family"]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), sharex=True)
    style = {"copy": "-", "pause": "--", "lora": ":"}
    for ax, panel in zip(axes.flat, panels):
        for run, pts in data["arms"].items():
            get = (lambda p: p["overall"]) if panel == "overall" else (lambda p: p["by_family"][panel])  # noqa: E731
            x = [p["traces"] / 1e6 for p in pts]
            ax.plot(x, [get(p)["em"] for p in pts], style[run.split("-")[0]], marker="o", ms=3, label=run)
            ax.fill_between(x, [get(p)["em_lo"] for p in pts], [get(p)["em_hi"] for p in pts], alpha=0.12)
        fz = data["frozen"]["overall"] if panel == "overall" else data["frozen"]["by_family"][panel]
        ax.axhline(fz["em"], color="black", lw=1, label="frozen decoder")
        ax.set_title(panel)
        ax.set_ylabel("held-out exact match, %")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("traces seen (millions)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        "Mechanism test, Gemma 3 270M frozen: exact match vs traces (95% Wilson bands; insertion at the marker)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results/mechanism_budget")
    ap.add_argument("--out", default="docs/mechanism_em_curve.png")
    args = ap.parse_args()
    data = curves(Path(args.results))
    (Path(args.results) / "curves.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, Path(args.out))
    print(f"wrote {Path(args.results) / 'curves.json'} and {args.out}")


if __name__ == "__main__":
    main()
