"""The trace kernel's fastest tile settings in a sweep of benchmarks/trace_attention.py, for the whole model.

Each setting's one-layer times (rows of layout ``kernel``: one trace per row) are summed over the model's layers: the
number of sliding and full layers (Gemma 3 270M: 15 and 3) times each block size the sweep ran (the decoder's and
the coprocessor's). Prints ``FORWARD/BACKWARD`` as ``CACHEAUG_TRACE_KERNEL_TILES`` takes it, and with ``--explain``
the totals and the fastest settings per block size L (the library's defaults pick the forward's by the rows' query
count: prefix_attention.CONFIG / WIDE_CONFIG) to stderr.

    python experiments/pick_tiles.py trace_attention.json                  # -> e.g. 64,64,8,2/64,32,8,2
    export CACHEAUG_TRACE_KERNEL_TILES=$(python experiments/pick_tiles.py trace_attention.json)
    python experiments/pick_tiles.py trace_attention.json --backward-only  # -> default/64,16,4,2, say
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def pick(result: dict, sliding: int = 15, full: int = 3) -> tuple[str, str, dict]:
    """(forward tiles, backward tiles, {pass: {tiles: summed ms}}) from a trace_attention.py result."""
    weight = {"sliding_attention": sliding, "full_attention": full}
    totals: dict = {"forward": defaultdict(float), "forward+backward": defaultdict(float)}
    shapes: dict = defaultdict(set)
    for row in result["rows"]:
        if row["layout"] != "kernel" or not row["kernel"].startswith("triton ") or row["pass"] not in totals:
            continue  # (also the row with the mask on every tile: another pass)
        tiles = row["kernel"].removeprefix("triton ")
        if row.get("launched", tiles) != tiles:  # refused at launch, ran at a fallback setting: not what it names
            continue
        totals[row["pass"]][tiles] += weight[row["layer"]] * row["ms"]
        shapes[(row["pass"], tiles)].add((row["layer"], row["L"]))
    best = []
    for name, sums in totals.items():
        every = max((len(shapes[(name, t)]) for t in sums), default=0)
        complete = {t: ms for t, ms in sums.items() if len(shapes[(name, t)]) == every}  # a cut sweep: timed rows only
        if not complete:
            raise SystemExit(f"pick_tiles: no Triton kernel rows of pass {name!r} in the result (a CPU run, or cut)")
        best.append(min(complete, key=complete.get))
    return best[0], best[1], {k: dict(v) for k, v in totals.items()}


def per_block_size(result: dict, sliding: int = 15, full: int = 3) -> dict:
    """{pass: {L: fastest tiles summed over that block size's layers}}."""
    sizes = sorted({row["L"] for row in result["rows"] if row["layout"] == "kernel"})
    picks = {L: pick({"rows": [r for r in result["rows"] if r["L"] == L]}, sliding, full) for L in sizes}
    return {name: {L: picks[L][i] for L in sizes} for i, name in enumerate(("forward", "forward+backward"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="JSON written by benchmarks/trace_attention.py --out")
    ap.add_argument("--sliding-layers", type=int, default=15)
    ap.add_argument("--full-layers", type=int, default=3)
    ap.add_argument("--explain", action="store_true")
    ap.add_argument(
        "--backward-only",
        action="store_true",
        help="print default/BACKWARD: the library's forward (its tiles by row size), the fastest backward",
    )
    args = ap.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    fwd, bwd, totals = pick(result, args.sliding_layers, args.full_layers)
    if args.explain:
        by_size = per_block_size(result, args.sliding_layers, args.full_layers)
        print(json.dumps({**totals, "fastest per block size L": by_size}, indent=1), file=sys.stderr)
    print(f"{'default' if args.backward_only else fwd}/{bwd}")


if __name__ == "__main__":
    main()
