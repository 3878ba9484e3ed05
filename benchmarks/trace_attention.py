"""One layer's trace attention alone, forward + backward, in each layout of the trace passes (docs/performance.md).

The shapes are Gemma 3 270M's (4 query heads, 1 key head of 256) at K traces of L queries over T text keys, batch B:

* ``chunk C``: C traces per row against a copy of the text keys (``trace_chunk``; C = K is the packed layout), a
  dense bool mask, key heads repeated for every query head (what transformers' sdpa does under a mask);
* ``windows``: one trace per row, the query heads folded into one row of queries, the keys gathered per row from
  the shared text keys (``trace_windows``, cacheaug.windows): the W-1 before the point on a sliding layer, the
  whole text on a full one; ``windows, chunk C``: a full layer's rows hold C traces (``trace_windows`` with
  ``trace_chunk`` C);
* ``kernel``: the same rows through cacheaug's own kernel (``trace_kernel``, cacheaug.prefix_attention): the text
  keys read in place, the tiles no query of a row sees skipped, no gradient for the text keys. ``--kernel-tiles``
  times the forward alone at several tile settings (BLOCK_M,BLOCK_N,num_warps,num_stages),
  ``--kernel-backward-tiles`` forward + backward at several settings of the backward kernel. Each kernel row has the
  largest differences from the sdpa windows (output, dQ, the block's dK and dV) and ``launched``, the settings the
  swept pass ran with (a setting that needs more shared memory than the GPU has falls back to a smaller one;
  experiments/pick_tiles.py leaves such rows out), and the result every launch's (``launch_configs``). A last row per
  layer times forward + backward at the default settings with the mask read on every tile (``full`` not given: what
  the tiles whose columns every query sees save; ``mean_text_keys_unmasked`` per row).

Each row also names the sdpa kernel torch picked (the fastest that accepts the inputs: each is tried alone).

    python benchmarks/trace_attention.py --out trace_attention.json             # GPU: the model's shapes
    python benchmarks/trace_attention.py --batch 1 --traces 16 --device cpu     # orientation only
    python benchmarks/trace_attention.py --kernel-only --kernel-backward-tiles 64,32,4,2 64,16,4,2   # a tile sweep

``--kernel-only`` leaves out the sdpa layouts' timed rows (the kernel rows still carry their differences from the
sdpa windows). The JSON is written again after every row, so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cacheaug import atomic, prefix_attention
from cacheaug.families import FULL, SLIDING, Family
from cacheaug.masks import dense_mask, trace_layout
from cacheaug.windows import TraceKeys, trace_attention, trace_keys

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class _Layer:  # what trace_attention reads from the attention module
    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx


def _time(fn, steps: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def _best_kernel(run, steps, device) -> tuple[str, float]:
    """The fastest sdpa kernel that accepts the inputs, tried one at a time, and its seconds per call."""
    best = None
    for name, backend in BACKENDS.items():
        if device.type != "cuda" and name != "math":
            continue
        try:
            with sdpa_kernel([backend]):
                s = _time(run, steps, device)
        except RuntimeError:
            continue  # this kernel refuses these inputs (mask, head size, dtype)
        if best is None or s < best[1]:
            best = (name, s)
    return best


def _launched(kind: str, tiles: str) -> str | None:
    """The settings a ``kind`` (forward/backward) launch asked at ``tiles`` ran with ("BM,BN,warps,stages"; another
    than asked where the GPU refused them: prefix_attention.FALLBACK_CONFIGS), None before any such launch."""
    for key, cfg in prefix_attention.launch_configs().items():
        if key.startswith(kind + " ") and key.endswith(f"(requested {tiles})"):
            return ",".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    return None


def _kernel_diffs(q, blk_k, blk_v, keys: TraceKeys) -> dict:
    """Largest differences of the kernel's output and gradients (q, block keys and values) from the sdpa windows'."""
    out = {}
    for name, k in (("sdpa", keys), ("kernel", keys)):
        k = TraceKeys(**{**k.__dict__, "kernel": name == "kernel"})
        for t in (q, blk_k, blk_v):
            t.grad = None
        o = trace_attention(_Layer(0), q, blk_k, blk_v, k)[0]
        o.float().square().sum().backward()
        out[name] = [o.detach().float()] + [t.grad.float() for t in (q, blk_k, blk_v)]
    names = ("out", "dq", "dk_block", "dv_block")
    diffs = {f"max_abs_diff_{n}": float((a - b).abs().max()) for n, a, b in zip(names, out["kernel"], out["sdpa"])}
    return {**diffs, **{f"max_abs_{n}": float(b.abs().max()) for n, b in zip(names, out["sdpa"])}}  # their scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--traces", type=int, default=128)
    ap.add_argument("--block", type=int, nargs="+", default=[31, 16], help="queries per trace (decoder, coprocessor)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[8])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument(
        "--kernel-tiles",
        nargs="+",
        default=["64,64,4,2"],
        help="tile settings of the forward kernel, each timed alone (no gradient): "
        "BLOCK_M,BLOCK_N,num_warps,num_stages each",
    )
    ap.add_argument(
        "--kernel-backward-tiles",
        nargs="+",
        default=["64,32,4,2"],
        help="tile settings of the backward kernel, each timed as forward + backward with the default forward settings",
    )
    ap.add_argument("--kernel-only", action="store_true", help="time the kernel rows alone (no sdpa layouts)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T, K, H, H_kv, D = args.batch, args.seq_len, args.traces, 4, 1, 256
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.randperm(T - 16, generator=g)[:K].sort().values for _ in range(B)]).to(device)
    text_k, text_v = (torch.randn(B, H_kv, T, D, generator=g).to(device, dtype) for _ in range(2))
    rows = []

    def save() -> None:
        if args.out:
            result = {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "batch": B,
                "seq_len": T,
                "traces": K,
                "window": args.window,
                "rows": rows,
                "launch_configs": prefix_attention.launch_configs(),
            }
            atomic.write_text(args.out, json.dumps(result, indent=2) + "\n")

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()  # after every row: a run cut short keeps what it timed

    for L in args.block:
        for layer_type, window in ((SLIDING, args.window), (FULL, None)):
            family = Family("gemma3_text", (layer_type,), window, True, "sdpa", None, "cache", None)
            for C in [] if args.kernel_only else args.chunks:  # C traces per row: the text copied K/C times
                n = K // C
                layout = trace_layout(positions.reshape(B * n, C), T, L)
                mask = dense_mask(layout, window)
                q = torch.randn(B * n, H, C * L, D, generator=g).to(device, dtype).requires_grad_()
                blk_k, blk_v = (
                    torch.randn(B * n, H_kv, C * L, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2)
                )

                def run_chunk():
                    k = torch.cat([text_k.repeat_interleave(n, 0), blk_k], 2).repeat_interleave(H // H_kv, 1)
                    v = torch.cat([text_v.repeat_interleave(n, 0), blk_v], 2).repeat_interleave(H // H_kv, 1)
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

                kernel, s = _best_kernel(run_chunk, args.steps, device)
                emit(
                    {
                        "layout": f"chunk {C}",
                        "layer": layer_type,
                        "L": L,
                        "keys_per_row": T + C * L,
                        "kernel": kernel,
                        "ms": round(1e3 * s, 3),
                    }
                )
            for C in [1] + (args.chunks if window is None and not args.kernel_only else []):  # full: C a row
                keys: TraceKeys = trace_keys([(text_k, text_v)], positions, L, family, H // H_kv, C)[layer_type]
                # laid out as the model's projections [N, L, heads, D], transposed (as transformers passes them)
                q = torch.randn(B * K, L, H, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
                blk_k, blk_v = (
                    torch.randn(B * K, L, H_kv, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
                    for _ in range(2)
                )

                def run_windows():
                    trace_attention(_Layer(0), q, blk_k, blk_v, keys)[0].sum().backward()

                if not args.kernel_only:
                    kernel, s = _best_kernel(run_windows, args.steps, device)
                    emit(
                        {
                            "layout": "windows" if C == 1 else f"windows, chunk {C}",
                            "layer": layer_type,
                            "L": L,
                            "keys_per_row": keys.mask.shape[-1],
                            "kernel": kernel,
                            "ms": round(1e3 * s, 3),
                        }
                    )
                keys = trace_keys([(text_k, text_v)], positions, L, family, H // H_kv, C, kernel=True)[layer_type]
                base = {
                    "layout": "kernel" if C == 1 else f"kernel, chunk {C}",
                    "layer": layer_type,
                    "L": L,
                    "keys_per_row": keys.bias.shape[-1],
                    "mean_text_keys_read": round(float((keys.hi - keys.lo).float().mean()), 1),
                    "mean_text_keys_unmasked": round(float((keys.full[:, 1] - keys.full[:, 0]).float().mean()), 1),
                }
                fwd, wide, bwd = (
                    dict(c)
                    for c in (prefix_attention.CONFIG, prefix_attention.WIDE_CONFIG, prefix_attention.BACKWARD_CONFIG)
                )
                sweep = [("forward", t) for t in args.kernel_tiles]
                sweep += [("forward+backward", t) for t in args.kernel_backward_tiles]
                if not args.kernel_only:  # the default settings, `full` not given
                    sweep += [("forward+backward, mask on every tile", None)]
                for passes, tiles in sweep:  # the forward's tiles timed alone; the backward's with the default forward
                    if tiles is None:
                        run_keys = dataclasses.replace(keys, full=None)
                        prefix_attention.CONFIG.update(fwd)
                        prefix_attention.WIDE_CONFIG.update(wide)
                        prefix_attention.BACKWARD_CONFIG.update(bwd)
                        s = _time(
                            lambda: trace_attention(_Layer(0), q, blk_k, blk_v, run_keys)[0].sum().backward(),
                            args.steps,
                            device,
                        )
                        emit(
                            {
                                **base,
                                "pass": passes,
                                "kernel": "triton (defaults)"
                                if prefix_attention.kernel_available(q)
                                else "torch reference",
                                "ms": round(1e3 * s, 3),
                                **_kernel_diffs(q, blk_k, blk_v, run_keys),
                            }
                        )
                        continue
                    bm, bn, warps, stages = (int(x) for x in tiles.split(","))
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                    prefix_attention.CONFIG.update(cfg if passes == "forward" else fwd)  # at every row size
                    prefix_attention.WIDE_CONFIG.update(cfg if passes == "forward" else wide)
                    prefix_attention.BACKWARD_CONFIG.update(bwd if passes == "forward" else cfg)

                    def run_kernel():
                        if passes == "forward":
                            with torch.no_grad():
                                trace_attention(_Layer(0), q, blk_k, blk_v, keys)
                        else:
                            trace_attention(_Layer(0), q, blk_k, blk_v, keys)[0].sum().backward()

                    s = _time(run_kernel, args.steps, device)
                    diffs = _kernel_diffs(q, blk_k, blk_v, keys)  # at this row's settings
                    ran = _launched("forward" if passes == "forward" else "backward", tiles)
                    emit(
                        {
                            **base,
                            "pass": passes,
                            "kernel": ("triton " + tiles)
                            if prefix_attention.kernel_available(q)
                            else "torch reference",
                            **({"launched": ran} if ran else {}),
                            "ms": round(1e3 * s, 3),
                            **diffs,
                        }
                    )
                prefix_attention.CONFIG.update(fwd)
                prefix_attention.WIDE_CONFIG.update(wide)
                prefix_attention.BACKWARD_CONFIG.update(bwd)
    save()


if __name__ == "__main__":
    main()
