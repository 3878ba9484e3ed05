"""Figures and markdown tables of docs/results.md from the raw JSON of experiments/gpu_report.py.

    python experiments/plot_report.py --results results/gpu_report --docs docs

Reads ``train_runs.json``, ``ppl.json``, ``stale.json`` and ``downstream.json`` (whichever exist) and writes
``report_ppl_by_offset.png``, ``report_training_curve.png``, ``report_staleness.png`` into ``--docs`` and the
tables as ``report_tables.md`` beside the JSON (pasted into docs/results.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "nl4": "coprocessor N_L=4",
    "nl16": "coprocessor N_L=16",
    "nl64": "coprocessor N_L=64",
    "pause16": "pause tokens (16)",
    "loradec": "LoRA decoder (r=64)",
    "scratch16": "random-init coprocessor (16)",
    "lora16": "LoRA coprocessor (r=64, 16)",
    "frozen": "frozen Gemma 3 270M",
}
# the paper's Table 1 (Gemma-2 2B trained on its own pretraining mix), N_L=16 and N_L=64
PAPER = {
    16: {1: -2.48, 2: -2.41, 4: -1.98, 8: -1.56, 16: -1.08, 32: -0.64},
    64: {1: -3.94, 2: -3.70, 4: -3.17, 8: -2.61, 16: -1.88, 32: -1.20},
}


def _name(path: str) -> str:
    return Path(path).parent.name


def ppl_figure(ppl: dict, out: Path) -> None:
    offsets = ppl["offsets"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for ckpt, r in ppl["runs"].items():
        name = _name(ckpt)
        lo = [m - a for m, a in zip(r["change"], r["lo"])]
        hi = [b - m for m, b in zip(r["change"], r["hi"])]
        ax.errorbar(offsets, r["change"], yerr=[lo, hi], marker="o", capsize=3, label=LABELS.get(name, name))
    ax.plot(list(PAPER[16]), list(PAPER[16].values()), "k--", label="paper, N_L=16 (Gemma-2 2B, own pretraining mix)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.set_xticks(offsets, [str(o) for o in offsets])
    ax.set_xlabel("offset after the insertion point (tokens)")
    ax.set_ylabel("held-out perplexity change vs frozen (%)")
    ax.set_title("Perplexity change by offset, same data and token budget (95% bootstrap CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def curve_figure(train: dict, out: Path, offsets=(1, 4, 16)) -> None:
    fig, axes = plt.subplots(1, len(offsets), figsize=(12, 3.8), sharey=False)
    for ax, o in zip(axes, offsets):
        for name, r in train["results"].items():
            pts = [
                (m["tokens"] / 1e6, m[f"eval_rel_ppl_offset_{o}"])
                for m in r["metrics"]
                if f"eval_rel_ppl_offset_{o}" in m
            ]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=LABELS.get(name, name))
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_title(f"offset {o}")
        ax.set_xlabel("training tokens (M)")
    axes[0].set_ylabel("held-out ppl change vs frozen (%)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Training curves: held-out per-offset perplexity change during training")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def stale_figure(stale: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for d, r in stale["by_delay"].items():
        lo = [m - a for m, a in zip(r["change"], r["lo"])]
        hi = [b - m for m, b in zip(r["change"], r["hi"])]
        ax.errorbar(stale["offsets"], r["change"], yerr=[lo, hi], marker="o", capsize=3, label=f"d = {d}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=20)
    ax.set_yticks([-20, 0, 20, 100, 1000, 10000], ["-20", "0", "+20", "+100", "+1000", "+10000"])
    ax.grid(alpha=0.3)
    ax.set_xticks(stale["offsets"], [str(o) for o in stale["offsets"]])
    ax.set_xlabel("offset after the insertion point (tokens)")
    ax.set_ylabel("perplexity change vs frozen (%)")
    ax.set_title("Staleness: latents computed d tokens before insertion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _fmt(m, lo, hi) -> str:
    return f"{m:+.1f}% [{lo:+.1f}, {hi:+.1f}]"


def tables(res: Path) -> str:
    lines = []
    if (res / "ppl.json").is_file():
        ppl = json.loads((res / "ppl.json").read_text())
        runs = {_name(c): r for c, r in ppl["runs"].items()}
        lines += [
            "| offset | frozen ppl | "
            + " | ".join(LABELS.get(n, n) for n in runs)
            + " | paper N_L=16 | paper N_L=64 |",
            "|---" * (len(runs) + 4) + "|",
        ]
        first = next(iter(runs.values()))
        for i, o in enumerate(ppl["offsets"]):
            cells = [_fmt(r["change"][i], r["lo"][i], r["hi"][i]) for r in runs.values()]
            paper = " | ".join(f"{PAPER[n][o]:+.2f}%" if o in PAPER[n] else "" for n in (16, 64))
            lines.append(f"| {o} | {first['base_ppl'][i]:.2f} | " + " | ".join(cells) + f" | {paper} |")
        lines.append("")
    if (res / "stale.json").is_file():
        st = json.loads((res / "stale.json").read_text())
        lines += [
            "| delay d | " + " | ".join(f"offset {o}" for o in st["offsets"]) + " |",
            "|---" * (len(st["offsets"]) + 1) + "|",
        ]
        for d, r in st["by_delay"].items():
            lines.append(
                f"| {d} | " + " | ".join(_fmt(m, a, b) for m, a, b in zip(r["change"], r["lo"], r["hi"])) + " |"
            )
        lines.append("")
    if (res / "downstream.json").is_file():
        ds = json.loads((res / "downstream.json").read_text())
        models = [m for m in ds if "results" in ds[m]]
        tasks = sorted({t for m in models for t in ds[m]["results"] if isinstance(ds[m]["results"][t], dict)})
        lines += [
            "| task (metric) | " + " | ".join(LABELS.get(m, m) for m in models) + " |",
            "|---" * (len(models) + 1) + "|",
        ]
        for t in tasks:
            for metric in ("acc", "acc_norm", "bits_per_byte"):
                cells, seen = [], False
                for m in models:
                    v = ds[m]["results"].get(t, {})
                    if f"{metric},none" in v:
                        seen = True
                        se = v.get(f"{metric}_stderr,none")
                        se = f" ± {se:.3f}" if isinstance(se, float) else ""
                        cells.append(f"{v[f'{metric},none']:.3f}{se}")
                    else:
                        cells.append("")
                if seen:
                    lines.append(f"| {t.removeprefix('cacheaug_')} ({metric}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args()
    res, docs = Path(args.results), Path(args.docs)
    if (res / "ppl.json").is_file():
        ppl_figure(json.loads((res / "ppl.json").read_text()), docs / "report_ppl_by_offset.png")
    if (res / "train_runs.json").is_file():
        curve_figure(json.loads((res / "train_runs.json").read_text()), docs / "report_training_curve.png")
    if (res / "stale.json").is_file():
        stale_figure(json.loads((res / "stale.json").read_text()), docs / "report_staleness.png")
    md = tables(res)
    (res / "report_tables.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
