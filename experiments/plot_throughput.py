"""Training throughput by GPU session: every measured row of the throughput benchmark in ``results/speedNN/``.

    python experiments/plot_throughput.py --results results --out docs/throughput_by_session.png

Reads every ``*.json`` written by ``benchmarks/train_throughput.py`` under ``results/speedNN/`` (NN: the session),
keeps the one-GPU rows at K=16 and K=128 (not the per-trace loop, not profiled, not failed), prints the fastest row of
each session and K (traces/s, batch, variant, file) and draws traces/s against the session: every row as a point, the
fastest per session as a line, the issue's targets as dashed lines.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TARGETS = {128: 8700.0, 16: 6000.0}  # traces/s on one H200 (the training-throughput issue)


def rows(results: Path) -> list[dict]:
    """One-GPU K=16 / K=128 rows of every benchmark report under ``results/speedNN/``, with their session."""
    out = []
    for f in sorted(results.glob("speed*/**/*.json")):
        session = re.match(r"speed(\d+)$", f.relative_to(results).parts[0])
        if session is None:
            continue
        try:
            report = json.loads(f.read_text())
        except ValueError:
            continue
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            continue  # another kind of result (serving, equivalence, kernel sweeps)
        for r in report["rows"]:
            config = str(r.get("config", ""))
            if (
                r.get("K") not in TARGETS
                or not r.get("traces_per_s")
                or r.get("loop")
                or "error" in r
                or "profiled" in config
                or "world" in r
            ):
                continue
            batch = re.search(r"B=(\d+)", config)
            out.append(
                {
                    "session": int(session.group(1)),
                    "K": r["K"],
                    "traces_per_s": float(r["traces_per_s"]),
                    "batch": int(batch.group(1)) if batch else report.get("batch"),
                    "variant": r.get("variant"),
                    "file": str(f.relative_to(results)),
                }
            )
    return out


def best_per_session(points: list[dict]) -> dict[int, list[dict]]:
    """For each K, the fastest row of each session, in session order."""
    best: dict[tuple[int, int], dict] = {}
    for p in points:
        key = (p["K"], p["session"])
        if key not in best or p["traces_per_s"] > best[key]["traces_per_s"]:
            best[key] = p
    return {K: [best[k] for k in sorted(best) if k[0] == K] for K in sorted({k[0] for k in best})}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {128: "tab:blue", 16: "tab:orange"}
    for K, best in best_per_session(points).items():
        mine = [p for p in points if p["K"] == K]
        ax.scatter(
            [p["session"] for p in mine], [p["traces_per_s"] / 1e3 for p in mine], s=14, alpha=0.4, color=colors[K]
        )
        ax.plot(
            [p["session"] for p in best],
            [p["traces_per_s"] / 1e3 for p in best],
            marker="o",
            color=colors[K],
            label=f"K={K}, fastest of the session",
        )
        ax.axhline(TARGETS[K] / 1e3, ls="--", lw=1, color=colors[K], label=f"K={K} target")
    ax.set_xlabel("GPU session (results/speedNN)")
    ax.set_ylabel("training traces/s (thousands), one H200")
    ax.set_title("Gemma 3 270M, N_L=N_A=16, T=1024: compiled step + CUDA graphs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="the folder holding speedNN/ folders")
    ap.add_argument("--out", default="docs/throughput_by_session.png")
    args = ap.parse_args()
    points = rows(Path(args.results))
    if not points:
        raise SystemExit(
            f"no throughput rows under {args.results}/speedNN/: run benchmarks/train_throughput.py "
            "with --out there first"
        )
    for K, best in best_per_session(points).items():
        for p in best:
            print(
                f"K={K:<4} session {p['session']:>2}: {p['traces_per_s']:>8,.0f} traces/s  batch {p['batch']:<4} "
                f"{p['variant']}  ({p['file']})"
            )
    plot(points, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
