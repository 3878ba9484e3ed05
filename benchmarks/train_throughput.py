"""Training throughput: text tokens/s, model FLOP utilisation and peak memory of one optimizer step.

Canonical config (issue 3): Gemma 3 270M frozen, full-copy coprocessor, T=1024, K=16, N_L=16, N_A=16, bf16
autocast with fp32 master weights, one H200:

    python benchmarks/train_throughput.py --model gemma-3-270m --batch 8 --seq-len 1024 --traces 16 128 \
        --variants sdpa sdpa+step sdpa+graphs sdpa+graphs+keeplogits --compare-loop --out throughput.json

Implementation variants (``--variants``) are timed on the canonical config; the fastest then times K=128, the
per-trace loop and the other inits (``--configs``).

CPU smoke run (what CI exercises): python benchmarks/train_throughput.py --model tiny --steps 2 --warmup 1

``--model random-270m``: Gemma 3 270M's architecture at random weights (the same shapes, kernels and counted FLOPs;
a step's speed does not depend on the weights), so a GPU call needs no staged model.

Also in the same run: ``first_step_s`` of every row (compiling and recording included), ``first_loss`` (the
first step's loss: a fixed seed draws the same text, points and random weights in every process, so two variants'
first losses differ only by what their kernels compute), ``--cached-repeat`` (the
best variant again in a fresh process with empty inductor / Triton caches and the compile artifacts this run saved:
``first_step_cached_s``, what a repeat run on a fresh machine pays), ``--world 2`` (two devices at the same
per-device batch, the coprocessor replicated with DDP and/or sharded with FSDP2, ``--parallel ddp fsdp``: ``ddp`` /
``fsdp`` rows with the summed traces/s and the scaling over one device), and on a GPU the peak memory
with and without the warm-up (CUDA graphs record their memory pool then) and the memory the allocator reserved.

FLOPs counted per optimizer step (N = non-embedding parameters of the decoder, D = hidden size, V = vocab;
attention score FLOPs and the optimizer are not counted):
    prefix pass (no grad)                     2 N . B T
    coprocessor forward + backward            6 N_c . B K N_L          (N_c = trainable coprocessor params)
    decoder on [latents; ahead] fwd + bwd-x   4 N . B K (N_L + N_A - 1)
    LM head on targets (fwd, recompute, bwd-x) 6 V D . B K N_A      (4 V D with the logits kept: no recompute;
                                                                       before commit 5e847a3 counted 6 for both)
MFU = counted FLOP/s / 790e12 (the H200's measured dense bf16 rate, see the device notes); on the CPU MFU is
not reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, build_model, load_base_model, speed
from cacheaug.evaluate import autocast_for
from cacheaug.masks import stratified_positions
from cacheaug.speed import allow_recompiles, apply_speed_options
from cacheaug.testing import random_gemma3_270m, tiny_model
from cacheaug.train import master_fp32, shard_coprocessor

PEAK_BF16 = 790e12
SPEED_KEYS = (
    "compile_mlp",
    "compile_masks",
    "compile_step",
    "trace_groups",
    "trace_chunk",
    "trace_windows",
    "trace_kernel",
    "rope_table",
)


# Where a profiled step's device time goes: kernel names (torch.profiler's keys; first match wins) -> kind
PROFILE_KINDS = (
    ("trace kernel", ("_prefix_attention_kernel", "_block_grad_kernel")),
    ("matrix products", ("nvjet", "gemm", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("sdpa attention", ("sdpa", "flash", "fmha", "attention")),
    ("loss (log-softmax)", ("log_softmax",)),
    ("fused element-wise (Triton)", ("triton_",)),
)


# CUDA runtime events the profiler lists with a device time that is no kernel's: "Command Buffer Full" is the host
# waiting for room in the launch queue (29.6 s of "device time" in one K=16 profile of session 22)
HOST_EVENTS = ("Command Buffer Full", "Activity Buffer Request")


def profile_kind(name: str) -> str | None:
    """The kind of a profiled kernel, "other" for the rest, None for a region that encloses kernels (a
    ``## Call CompiledFxGraph`` annotation, a profiler step: counting it too would count its kernels twice) and for
    a CUDA runtime event (``cuda*`` calls, ``HOST_EVENTS``), which is no device work."""
    if (
        name.startswith("## ")
        or name.startswith("ProfilerStep")
        or name in ("CompiledFunction", "CompiledFunctionBackward")
    ):
        return None
    if name in HOST_EVENTS or name.startswith("cuda"):
        return None
    low = name.lower()
    return next((kind for kind, keys in PROFILE_KINDS if any(k.lower() in low for k in keys)), "other")


def profile_breakdown(times: list[tuple[str, float]], steps: int, total_us: float | None = None) -> dict:
    """ms per step by kind from (kernel name, self time in us); with ``total_us`` (a table that lists only its top
    rows) the rest of that total is ``below the listed rows``."""
    out: dict = {kind: 0.0 for kind, _ in PROFILE_KINDS}
    out["other"] = 0.0
    listed = 0.0
    for name, us in times:
        kind = profile_kind(name)
        if kind is not None:
            out[kind] += us
            listed += us
    if total_us is not None:
        out["below the listed rows"] = max(0.0, total_us - listed)
    return {k: round(v / steps / 1e3, 2) for k, v in out.items()}


def breakdown_of_table(text: str, steps: int = 2) -> dict:
    """profile_breakdown of a table this benchmark wrote (--profile): its first table's rows by their self device
    time (self CPU time for a CPU run)."""
    import re

    def us(field: str) -> float:
        value = float(re.match(r"[\d.]+", field).group())
        return value * {"us": 1.0, "ms": 1e3, "s": 1e6}[re.search(r"(us|ms|s)$", field).group()]

    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("Name"))
    columns = re.split(r"\s{2,}", lines[header].strip())
    column = columns.index("Self CUDA") if "Self CUDA" in columns else columns.index("Self CPU")
    times, total = [], None
    for line in lines[header + 2 :]:
        if line.startswith("---"):
            continue
        if not line.strip():
            break
        fields = re.split(r"\s{2,}", line.strip())
        if len(fields) == len(columns):
            times.append((fields[0], us(fields[column])))
    for line in lines:
        m = re.match(r"Self (CUDA|CPU) time total: (\S+)", line)
        if m and m.group(1) == ("CUDA" if "Self CUDA" in columns else "CPU"):
            total = us(m.group(2))
    return profile_breakdown(times, steps, total)


def step_flops(model: CacheAugmentedLM, B: int, T: int, K: int) -> float:
    """Counted FLOPs of one step (the module docstring); the LM head's logits are computed again in backward only
    with ``model.recompute_loss`` (the default; ``--keep-logits`` turns it off)."""
    cfg = model.config
    emb = model.base.get_input_embeddings().weight
    V, D = emb.shape
    N = sum(p.numel() for p in model.base.parameters()) - emb.numel()
    N_c = sum(p.numel() for p in model.trainable_parameters())
    return (
        2 * N * B * T
        + 6 * N_c * B * K * cfg.n_latents
        + 4 * N * B * K * (cfg.n_latents + cfg.n_ahead - 1)
        + (6 if model.recompute_loss else 4) * V * D * B * K * cfg.n_ahead
    )


# the fastest setup measured on one H200 (docs/performance.md, "Session 24"): the compiled step replayed as CUDA graphs,
# the loss's logits kept, trace rows through cacheaug's kernel, rotary tables; every part trains what the eager step does
FASTEST = "sdpa+graphs+keeplogits+k+r"


def measure(model, B, T, K, steps, warmup, loop=False, profile: str | None = None, forward=None, seed: int = 0) -> dict:
    """Time ``steps`` optimizer steps after ``warmup`` ones; ``forward`` is the module called (a DDP wrapper, say)."""
    device = model.device
    forward = forward or model
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(seed)
    vocab = model.base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (B, T), generator=g).to(device)
    # what training draws: uniform distinct points, or stratified over the trace groups (variant +gN)
    positions = stratified_positions(B, T - model.config.n_ahead, K, model.trace_groups, g)

    def one_step():
        with autocast_for(model):
            if loop:  # the naive baseline: one full three-pass forward per trace
                total = 0.0
                for k in range(K):
                    loss = forward(ids, positions=positions[:, k : k + 1]).loss / K
                    loss.backward()
                    total = total + loss.detach()
                loss = total
            else:
                loss = forward(ids, positions=positions).loss
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t_first = time.perf_counter()
    first_loss = one_step()  # the first step compiles (and records the CUDA graphs) when the variant asks for it
    sync()
    first_step_s = time.perf_counter() - t_first
    # the same seed draws the same text, points and (random-270m, tiny) weights in every process: two variants' first
    # losses differ only by what their kernels compute differently
    first_loss = float(first_loss)
    for _ in range(warmup - 1):
        one_step()
    warmup_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        # the warm-up includes compiling and recording CUDA graphs, whose memory pool the timed steps reuse
        warmup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    breakdown = None
    if profile:  # where the time of a step goes: host (Python, launches) vs device kernels
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                one_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        breakdown = profile_breakdown([(e.key, getattr(e, attr, 0.0)) for e in table], steps=2)
        Path(profile).write_text(
            table.table(sort_by=sort, row_limit=120)
            + "\n\nby host time:\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=25)
            + "\n\nms per step by kind ("
            + ("device" if device.type == "cuda" else "host")
            + " time):\n"
            + json.dumps(breakdown, indent=1)
            + "\n"
        )
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    row = {
        "K": K,
        "loop": loop,
        "seconds_per_step": round(dt, 4),
        "text_tokens_per_s": round(B * T / dt),
        "traces_per_s": round(B * K / dt, 1),
        "first_step_s": round(first_step_s, 2),
        "first_loss": round(first_loss, 6),
        **({"profile_ms_per_step": breakdown} if breakdown else {}),
    }  # insertion points trained per second: what the method learns from
    if model.arm.has_latents:  # the count below is for a coprocessor (pause: N_c ~ 0)
        flops = step_flops(model, B, T, K)
        row.update(counted_gflop_per_step=round(flops / 1e9, 3), tflop_per_s=round(flops / dt / 1e12, 4))
        if device.type == "cuda":
            row["mfu_pct"] = round(100 * flops / dt / PEAK_BF16, 2)
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_mem_incl_warmup_gib"] = round(max(warmup_peak, torch.cuda.max_memory_allocated()) / 2**30, 2)
        row["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)  # the allocator's pools, graphs' included
    return row


def ddp_worker(rank: int, world: int, store: str, args, variant: str, K: int, out: str, parallel: str = "ddp") -> None:
    """One rank of the multi-device measurement: the canonical config at the same per-device batch, the coprocessor
    replicated with its gradients all-reduced (``ddp``) or sharded per layer with FSDP2 (``fsdp``, as ``cacheaug train
    --parallel fsdp`` does: ``cacheaug.train.shard_coprocessor``). The ranks meet through a file (``store``), not a
    TCP port: no port picked by one process can be taken by another before rank 0 binds it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        v = parse_variant(variant)
        allow_recompiles()
        model = build(load(args, device, v["attn"]), args, K, keep_logits=v["keep_logits"])
        apply_speed_options(model, **{k: v[k] for k in SPEED_KEYS})
        if parallel == "fsdp":
            shard_coprocessor(model, device)
            wrapped = model
        else:
            wrapped = DistributedDataParallel(model, device_ids=[device] if cuda else None)
        row = measure(model, args.batch, args.seq_len, K, args.steps, args.warmup, forward=wrapped, seed=rank)
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure_ddp(args, variant: str, K: int, single: dict, parallel: str = "ddp") -> dict:
    """DDP or FSDP2 (``parallel``) over ``args.world`` devices (processes) at the per-device batch of ``single``;
    traces/s summed."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out, store = str(Path(tmp) / "ddp.json"), str(Path(tmp) / "store")
        mp.spawn(ddp_worker, args=(args.world, store, args, variant, K, out, parallel), nprocs=args.world, join=True)
        ranks = json.loads(Path(out).read_text())
    dt = max(r["seconds_per_step"] for r in ranks)  # the step ends when the slowest rank's all-reduce does
    traces = round(args.world * args.batch * K / dt, 1)
    return {
        "variant": variant,
        "config": f"copy:{args.n_latents} {parallel}",
        "K": K,
        "world": args.world,
        "per_device_batch": args.batch,
        "seconds_per_step": round(dt, 4),
        "traces_per_s": traces,
        "text_tokens_per_s": round(args.world * args.batch * args.seq_len / dt),
        "scaling_vs_one": round(traces / single["traces_per_s"], 3),
        "first_step_s": max(r["first_step_s"] for r in ranks),
        **(
            {"peak_mem_incl_warmup_gib": max(r["peak_mem_incl_warmup_gib"] for r in ranks)}
            if "peak_mem_incl_warmup_gib" in ranks[0]
            else {}
        ),
    }


def cached_repeat(args, variant: str, cache: str) -> dict:
    """The best variant again in a fresh process with empty inductor and Triton caches, loading ``cache``: what the
    first step of a repeat run on a fresh machine costs."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "repeat.json"
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--device",
            args.device,
            "--variants",
            variant,
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--traces",
            str(args.traces[0]),
            "--n-latents",
            str(args.n_latents),
            "--n-ahead",
            str(args.n_ahead),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--compile-cache",
            cache,
            "--out",
            str(out),
        ]
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
            "TRITON_CACHE_DIR": str(Path(tmp) / "triton"),
        }
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        report = json.loads(out.read_text())
    row = report["rows"][0]
    return {"first_step_cached_s": row["first_step_s"], "compile_cache_bytes": report.get("compile_cache_loaded", 0)}


def parse_variant(name: str) -> dict:
    try:
        return speed.parse_variant(name)
    except ValueError as err:
        raise SystemExit(f"--variants: {err}") from None


def load(args, device, attn):
    if args.model == "tiny":
        return tiny_model("gemma3", attn, device=device)
    if args.model == "random-270m":
        return random_gemma3_270m(device, attn)
    return load_base_model(args.model, device=device, attn_implementation=attn)[0]


def build(base, args, K, init="copy", n_latents=None, keep_logits=False):
    cfg = CoprocessorConfig(n_latents or args.n_latents, args.n_ahead, K, init=init)
    model = build_model(base, cfg, check_finite=False)
    model.recompute_loss = not keep_logits
    master_fp32(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="gemma-3-270m",
        help="'gemma-3-270m', 'random-270m' (its architecture at "
        "random weights, for timing: nothing to stage) or 'tiny' (random 3-layer Gemma-3)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="implementation variants timed at the first K, e.g. flex sdpa flex+masks flex+masks+mlp "
        "(default: on a GPU the fastest setup measured, sdpa+graphs+keeplogits+k+r; on the CPU sdpa); the "
        "fastest one runs everything else",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--traces", type=int, nargs="+", default=[16])
    ap.add_argument("--n-latents", type=int, default=16)
    ap.add_argument("--n-ahead", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare-loop", action="store_true", help="also time a per-trace loop at the first K")
    ap.add_argument(
        "--configs",
        nargs="*",
        default=[],
        help="also time other inits at the first K, as INIT:N_L (e.g. pause:16 lora-decoder:16 copy:64): "
        "the step times the evaluation runs are sized from",
    )
    ap.add_argument(
        "--batches",
        type=int,
        nargs="*",
        default=[],
        help="also time the canonical config at these batch sizes (the step is launch-bound: larger "
        "batches raise tokens/s until the arithmetic takes over)",
    )
    ap.add_argument(
        "--profile",
        default=None,
        help="write a torch.profiler table of two canonical steps here, and "
        "the ms per step by kind (trace kernel, matrix products, loss, ...) in the row",
    )
    ap.add_argument(
        "--breakdown",
        default=None,
        metavar="TABLE",
        help="print the ms per step by kind of a table written by --profile (two steps) and exit",
    )
    ap.add_argument(
        "--compile-cache",
        default=None,
        help="load torch.compile artifacts from this file first (if it exists) and save this run's there",
    )
    ap.add_argument(
        "--cached-repeat",
        action="store_true",
        help="time the best variant's first step again in a fresh process with empty compiler caches and "
        "this run's compile artifacts (--compile-cache, or a temporary file)",
    )
    ap.add_argument(
        "--world",
        type=int,
        default=1,
        help="also time DDP over this many devices (processes) at the same per-device batch (GPU: NCCL, "
        "one GPU each; CPU: gloo)",
    )
    ap.add_argument(
        "--parallel",
        nargs="+",
        choices=["ddp", "fsdp"],
        default=["ddp"],
        help="with --world > 1: how the coprocessor is spread, each timed in turn: replicated with "
        "gradients all-reduced (ddp) and/or sharded per layer with FSDP2 (fsdp; the coprocessor's "
        "weights, gradients and optimizer state split over the devices)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.breakdown:
        print(json.dumps(breakdown_of_table(Path(args.breakdown).read_text()), indent=1))
        return
    device = torch.device(args.device)
    if args.model == "tiny":
        args.seq_len = min(args.seq_len, 128)
    variants = args.variants or ([FASTEST] if device.type == "cuda" else ["sdpa"])
    meta = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "n_latents": args.n_latents,
        "n_ahead": args.n_ahead,
        "torch": torch.__version__,
    }

    def save(best_name=None):  # after every row: a run cut short by a time limit keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps({**meta, "best_variant": best_name, "rows": rows}, indent=2) + "\n")

    for name in variants:  # fail on a misspelt variant before any work
        parse_variant(name)
    if args.world < 1 or (device.type == "cuda" and args.world > torch.cuda.device_count()):
        raise SystemExit(f"--world {args.world}: this machine has {torch.cuda.device_count()} GPUs")
    if args.compile_cache:
        meta["compile_cache_loaded"] = speed.load_compile_cache(args.compile_cache)
    allow_recompiles()  # flex: one kernel per shape, and this benchmark runs many
    K0 = args.traces[0]
    rows, best = [], None
    for name in variants:  # each variant on a freshly loaded decoder (compiling changes modules in place)
        v = parse_variant(name)
        model = base = None
        try:
            base = load(args, device, v["attn"])
            model = build(base, args, K0, keep_logits=v["keep_logits"])
            apply_speed_options(model, **{k: v[k] for k in SPEED_KEYS})
            t0 = time.perf_counter()
            row = {
                "variant": name,
                "config": f"copy:{args.n_latents}",
                **measure(model, args.batch, args.seq_len, K0, args.steps, args.warmup),
            }
            row["wall_s_incl_compile"] = round(time.perf_counter() - t0, 1)
        except Exception as err:  # one broken variant must not lose the others' figures
            row = {"variant": name, "error": f"{type(err).__name__}: {err}"[:500]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
        if "seconds_per_step" in row and (best is None or row["seconds_per_step"] < best[1]["seconds_per_step"]):
            best = (name, row)
        apply_speed_options(model, compile_masks=False)
        model = base = None
    if best is None:
        raise SystemExit("every variant failed")
    name, v = best[0], parse_variant(best[0])
    base = load(args, device, v["attn"])

    def timed(K, init="copy", n_latents=None, label="", **kw):
        model = build(base, args, K, init, n_latents, keep_logits=v["keep_logits"])
        apply_speed_options(model, **{k: v[k] for k in SPEED_KEYS})
        row = {
            "variant": name,
            "config": f"{init}:{n_latents or args.n_latents}{label}",
            **measure(model, args.batch, args.seq_len, K, **kw),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(name)
        return row

    save(name)
    for spec in args.configs:  # first: the evaluation runs are sized from these
        init, _, n = spec.partition(":")
        try:
            timed(K0, init, int(n or args.n_latents), steps=max(2, args.steps // 2), warmup=2)
        except Exception as err:
            rows.append({"variant": name, "config": spec, "error": f"{type(err).__name__}: {err}"[:500]})
    if args.profile:
        timed(K0, steps=1, warmup=1, profile=args.profile, label=" profiled")
    for B in args.batches:
        batch, args.batch = args.batch, B
        try:
            timed(K0, steps=args.steps, warmup=args.warmup, label=f" B={B}")
        except torch.OutOfMemoryError as err:
            rows.append({"variant": name, "config": f"copy:{args.n_latents} B={B}", "error": str(err)[:300]})
        args.batch = batch
    if args.compare_loop:
        timed(K0, steps=max(1, args.steps // 4), warmup=1, loop=True)
        rows[-1]["speedup_of_parallel"] = round(rows[-1]["seconds_per_step"] / best[1]["seconds_per_step"], 2)
        save(name)
    for K in args.traces[1:]:
        timed(K, steps=args.steps, warmup=args.warmup)
    apply_speed_options(base, compile_masks=False)
    cache = args.compile_cache
    if args.cached_repeat and not cache:
        import tempfile

        cache = str(Path(tempfile.mkdtemp()) / "compile_cache.bin")
    if cache:
        meta["compile_cache_saved"] = speed.save_compile_cache(cache)
    if args.cached_repeat:
        meta.update(first_step_cold_s=best[1]["first_step_s"], **cached_repeat(args, name, cache))
        save(name)
    if args.world > 1:
        base = None
        for parallel in args.parallel:
            try:
                row = measure_ddp(args, name, K0, best[1], parallel)
            except Exception as err:  # a failed FSDP2 run must not lose the DDP row
                row = {
                    "variant": name,
                    "config": f"copy:{args.n_latents} {parallel}",
                    "error": f"{type(err).__name__}: {err}"[:500],
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
            save(name)


if __name__ == "__main__":
    main()
