"""Serving latency: time to first token per policy, augmentation latency, and the same "thinking" as CoT tokens.

Targets (H200, Gemma 3 270M, 1k-token prompt): the engine's batch-1 decoding step at least as fast as Hugging Face
``generate`` with a static cache (measured in the same run); async time-to-first-token within 5% of ``off``; sync
augmentation's cost in decoding steps; tokens/s at 1, 8 and 32 concurrent requests.

    python benchmarks/serve_latency.py --model gemma-3-270m --prompt-lens 1024 4096 --latents 16 64 --out serve.json
    python benchmarks/serve_latency.py --model tiny --prompt-lens 64 --latents 4 --repeats 2     # CPU smoke run

``--model random-270m``: Gemma 3 270M's architecture with random weights (timing only: the same shapes and kernels
as the real model, no model files needed; the token agreements then compare near-uniform logits).

Measured through the engine (no HTTP), median of ``--repeats`` after one warm-up:
  ttft_<policy>        prompt in -> first token out, per policy (off / sync / async), in requests of --tokens
  t<N>_<policy>        prompt in -> last of the N tokens out (async: the coprocessor runs meanwhile)
  async_inserted_after_tokens   tokens decoded before an async request's latents went in (then replayed)
  async_outcomes, sync_outcomes  augmented / late / failed per request; async_latents_s: the median time from an async
                       request's coprocessor submission to its end (while the request decodes beside it)
  async_insert_s       the median time an async request's insertion (latents and the tokens replayed) held the
                       engine loop's thread; at --concurrency: augmented_c<C>_async (requests augmented),
                       insert_s_c<C>_async (median) and insert_total_s_c<C>_async (summed: the loop's time on them);
                       augmented_steps_c<C>_async counts the same requests from their tokens (a cross-check);
                       insert_calls_c<C>_async: the decoder calls that inserted them (requests whose latents the
                       loop found ready together share one; insert_s is each request's share of its call)
  <policy>_call_queued_s / _launch_s / _device_s   where a call's time went (medians): waiting for the worker thread to
                       take it, its host side (Python, kernel launches), then until its CUDA stream finished; sync's
                       calls run alone, async's beside decoding (interpreter contention shows in launch, GPU in device)
  (every timed request starts once the coprocessor is idle: an earlier request's call would compete with it)
  prefill_s            the engine's prefill of the prompt alone (cache + first logits): ttft_off - prefill_s is what the
                       engine loop, the first token's choice and the hand-off to the reader add
  augment_s            the coprocessor pass + latent insertion alone (sync's extra cost)
  decode_token_s       one decoding step after the prompt; ``augment_vs_8_tokens`` = augment_s / (8 x it)
  cot_equiv_s          generating N_L tokens instead (the same number of extra positions as "thinking" text)
  engine_step_s        the engine's own decoding step at batch 1: (t<N>_off - ttft_off) / (N - 1)
  slab_step_s          the slab's step alone at batch 1 (a CUDA graph replay on a GPU) and the greedy token read to
                       the host, without the engine loop and its threads: engine_step_s - slab_step_s is the loop's cost
  hf_static_step_s     the same for Hugging Face ``generate(cache_implementation="static")``, greedy, same prompt:
                       the median interval between its new tokens; ``engine_vs_hf_static`` = engine / HF
  augment_in_steps     augment_s / engine_step_s: sync's extra cost in decoding steps
  engine_dynamic_step_s   the same batch-1 step with ``Engine(static_batch=False)`` (caches padded and split every
                       step, no CUDA graphs): what the slab and its CUDA graphs buy
  static_agrees_tokens, hf_agrees_tokens   leading greedy tokens of an ``off`` request on which the static engine
                       agrees with the dynamic one, and with HF ``generate`` (bf16 kernels of other shapes may flip a
                       near-tie; the exactness itself is tested on the CPU, tests/test_slab.py)
  cuda_graphs, graphs_recorded   whether the slab replayed CUDA graphs, and how many step shapes it recorded
  coprocessor_graph_calls, _replays, _buckets   with ``--coprocessor-graphs``: coprocessor calls through the bucketed
                       path so far, how many were CUDA graph replays (a GPU), and the prefix-length buckets (latent_graphs.py)
  coprocessor_graphs_max_abs_diff, _rel_diff   the latents of one more call on the prompt against ``compute_latents``
                       (masked bucket against the causal path: bf16 rounding on a GPU)
  concurrency          ``--concurrency C ...``: C requests of --tokens tokens at once (policy off and async),
                       total generated tokens / wall time (tokens_per_s_c<C>_<policy>), after a 2-token warm-up whose
                       time is warmup_c<C>_<policy>_s (a new compiled shape compiles there); compiles_c<C>_<policy>:
                       the graphs torch.compile had made in the process after the timed run (one more than after
                       the previous run means a compile inside the timed window)
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig, load_base_model
from cacheaug.serving import Engine
from cacheaug.testing import random_gemma3_270m, tiny_model


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (and compile)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def request_times(engine, prompt, policy, n_tokens, device) -> tuple[float, float, int | None, dict]:
    """(time to the first token, time to the last, tokens decoded before the latents went in, the request's info) of
    one request, started once the coprocessor has nothing left to do (an earlier request's call would compete)."""
    wait_idle(engine)
    _sync(device)
    info: dict = {}
    t0 = time.perf_counter()
    first, step = None, None
    for step in engine.stream(prompt, n_tokens, policy=policy, info=info):  # each Step holds a host int: synced
        first = first if first is not None else time.perf_counter() - t0
    return first, time.perf_counter() - t0, step.inserted_after if step is not None else None, info


def wait_idle(engine, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not engine.worker.idle():
        if time.monotonic() > end:
            raise RuntimeError(f"the coprocessor was still busy after {timeout} s: the timings would not be comparable")
        time.sleep(0.001)


def concurrent_tokens_per_s(engine, prompts, policy, n_tokens, device, infos: list | None = None) -> float:
    """``len(prompts)`` requests of ``n_tokens`` at once (one reader thread each): generated tokens per second;
    each request's own ``info`` (its outcome, insert_s...; :meth:`Engine.stream`), with ``augmented`` from its
    last token's step beside it, appended to ``infos`` when given."""
    counts, got = [0] * len(prompts), [{} for _ in prompts]

    def client(i):
        tokens, summary = engine.generate(prompts[i], n_tokens, policy=policy, info=got[i])
        got[i]["augmented"] = summary["augmented"]
        counts[i] = len(tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    _sync(device)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _sync(device)
    took = time.perf_counter() - t0
    if infos is not None:
        infos.extend(got)
    return sum(counts) / took


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (the decoding step's with --compile-decode, and any that
    Hugging Face's static-cache ``generate`` compiled for the baseline)."""
    import torch._dynamo

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def hf_static_step_s(base, ids, n_tokens, device, repeats) -> float:
    """Per-token time of Hugging Face ``generate`` with its static cache (greedy, no early stop): the median interval
    between consecutive new tokens, as a streamer sees them (each token read to the host)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            value.cpu()  # the token is known on the host now
            self.times.append(time.perf_counter())

        def end(self):
            pass

    steps = []
    for i in range(repeats + 1):  # the first one warms up
        clock = Clock()
        base.generate(
            ids,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            cache_implementation="static",
            streamer=clock,
        )
        if i:  # put() sees the prompt first, then each new token
            steps += [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return statistics.median(steps)


def slab_step_s(engine, prompt, device, steps: int = 30) -> float:
    """Median time of the slab's batch-1 step plus the greedy token's read, on a cache of ``prompt``."""
    slab = engine.slab
    cache, logits, _ = engine.prefill(prompt)
    row = slab.adopt(cache)
    token, times = int(logits.argmax(-1)), []
    try:
        for i in range(steps + 2):
            _sync(device)
            t0 = time.perf_counter()
            token = int(slab.step([row], [token], [slab.length[row]]).argmax(-1))
            times.append(time.perf_counter() - t0)
    finally:
        slab.release(row)
    return statistics.median(times[2:])  # the first records the graph


@torch.no_grad()
def graph_latents_check(model, graphs, ids, prompt) -> dict:
    """Max |latents of the graph path - compute_latents| for ``prompt``, and that over the latents' max |value|."""
    from transformers import DynamicCache

    from cacheaug import kv

    cache = DynamicCache()
    model.base(ids, use_cache=True, **{model.family.cache_kwarg: cache})
    ref = model.compute_latents(cache, len(prompt), ids[:, -1]).float()
    got = graphs(kv.layers(cache), len(prompt), prompt[-1]).float()
    diff = (got - ref).abs().max().item()
    return {"coprocessor_graphs_max_abs_diff": diff, "coprocessor_graphs_rel_diff": diff / ref.abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m', 'random-270m' (timing only) or 'tiny'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--latents", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per timed request (at least 2)")
    ap.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=[1, 8, 32],
        help="concurrent requests for the tokens/s rows (at the first prompt length and N_L)",
    )
    ap.add_argument(
        "--coprocessor-priority",
        default="normal",
        choices=("normal", "high"),
        help="CUDA priority of the engine's coprocessor stream (Engine(coprocessor_priority=...))",
    )
    ap.add_argument(
        "--coprocessor-graphs",
        action="store_true",
        help="run each prefix's coprocessor call as a CUDA graph replay (Engine(coprocessor_graphs=True))",
    )
    ap.add_argument(
        "--compile-decode",
        default=None,
        help="torch.compile the slab's step with this backend (e.g. inductor) before recording it",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval(S) first: how long a Python thread may hold the interpreter while "
        "another waits (default 0.005 s); the engine loop and the coprocessor's thread share it",
    )
    ap.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-path engine (static_batch=False) rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tokens < 2:
        raise SystemExit("--tokens must be at least 2 (the step time is measured between the first and the last)")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    device = torch.device(args.device)
    if args.model == "tiny":
        base = tiny_model("gemma3", "sdpa", device=device)
    elif args.model == "random-270m":
        base = random_gemma3_270m(device)
    else:
        base, _ = load_base_model(args.model, device=device)
    vocab = base.get_input_embeddings().weight.shape[0]
    rows = []
    for n_latents in args.latents:
        model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=n_latents))
        engine = Engine(
            model,
            default_deadline_s=60.0,
            max_batch=max([16, *args.concurrency]),
            compile_decode=args.compile_decode,
            coprocessor_priority=args.coprocessor_priority,
            coprocessor_graphs=args.coprocessor_graphs,
        )
        for P in args.prompt_lens:
            prompt = torch.randint(3, vocab, (P,), generator=torch.Generator().manual_seed(P)).tolist()
            ids = torch.tensor([prompt], device=device)
            row = {"n_latents": n_latents, "prompt_len": P}
            runs = {policy: [] for policy in ("off", "sync", "async")}
            for i in range(args.repeats + 1):  # whole requests of --tokens tokens, the policies interleaved
                for policy in runs:
                    result = request_times(engine, prompt, policy, args.tokens, device)
                    if i:  # the first round warms up
                        runs[policy].append(result)
            for policy, results in runs.items():
                row[f"ttft_{policy}_s"] = statistics.median(r[0] for r in results)
                row[f"t{args.tokens}_{policy}_s"] = statistics.median(r[1] for r in results)
            row["async_inserted_after_tokens"] = [r[2] for r in runs["async"]]
            row["async_outcomes"] = [r[3].get("outcome") for r in runs["async"]]
            row["sync_outcomes"] = [r[3].get("outcome") for r in runs["sync"]]
            wait_idle(engine)  # the last async call's time, even if its request stopped waiting for it
            took = [r[3]["latents_s"] for r in runs["async"] if "latents_s" in r[3]]
            row["async_latents_s"] = statistics.median(took) if took else None
            inserts = [r[3]["insert_s"] for r in runs["async"] if "insert_s" in r[3]]
            row["async_insert_s"] = statistics.median(inserts) if inserts else None
            for policy in ("sync", "async"):  # where a coprocessor call's time went, alone (sync) and beside decoding
                for part in ("queued_s", "launch_s", "device_s"):
                    got = [r[3][part] for r in runs[policy] if part in r[3]]
                    row[f"{policy}_call_{part}"] = statistics.median(got) if got else None
            row["prefill_s"] = timed(lambda: engine.prefill(prompt), device, args.repeats)
            row["augment_s"] = timed(lambda: model.augment(ids), device, args.repeats) - row["prefill_s"]
            cache_then_step = (
                lambda: model.decode(  # noqa: E731
                    engine.prefill(prompt)[0], ids[:, -1:], len(prompt), logits_to_keep=1
                )
            )
            row["decode_token_s"] = timed(cache_then_step, device, args.repeats) - row["prefill_s"]
            row["cot_equiv_s"] = timed(
                lambda: base.generate(ids, max_new_tokens=n_latents, min_new_tokens=n_latents, do_sample=False),
                device,
                args.repeats,
            )
            row["async_overhead_pct"] = 100 * (row["ttft_async_s"] / row["ttft_off_s"] - 1)
            row["async_total_overhead_pct"] = 100 * (row[f"t{args.tokens}_async_s"] / row[f"t{args.tokens}_off_s"] - 1)
            row["augment_vs_8_tokens"] = row["augment_s"] / (8 * max(row["decode_token_s"], 1e-9))
            row["engine_step_s"] = (row[f"t{args.tokens}_off_s"] - row["ttft_off_s"]) / (args.tokens - 1)
            row["hf_static_step_s"] = hf_static_step_s(base, ids, args.tokens, device, args.repeats)
            row["engine_vs_hf_static"] = row["engine_step_s"] / max(row["hf_static_step_s"], 1e-9)
            row["augment_in_steps"] = row["augment_s"] / max(row["engine_step_s"], 1e-9)
            dynamic = (
                None
                if args.no_dynamic
                else Engine(model, default_deadline_s=60.0, max_batch=engine.scheduler.max_batch, static_batch=False)
            )
            static_tokens = engine.generate(prompt, args.tokens, policy="off")[0]
            if dynamic is not None:
                runs = [request_times(dynamic, prompt, "off", args.tokens, device) for _ in range(args.repeats + 1)][1:]
                row["engine_dynamic_step_s"] = statistics.median((r[1] - r[0]) / (args.tokens - 1) for r in runs)
                row["static_agrees_tokens"] = leading_agreement(
                    static_tokens, dynamic.generate(prompt, args.tokens, policy="off")[0]
                )
            hf_tokens = base.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)[
                0, P:
            ].tolist()
            row["hf_agrees_tokens"] = leading_agreement(static_tokens, hf_tokens)
            if engine.slab is not None:
                row["slab_step_s"] = slab_step_s(engine, prompt, device)
                row["cuda_graphs"], row["graphs_recorded"] = engine.slab.cuda_graphs, len(engine.slab.graphs)
            if n_latents == args.latents[0] and P == args.prompt_lens[0]:
                for c in args.concurrency:
                    prompts = [
                        torch.randint(3, vocab, (P,), generator=torch.Generator().manual_seed(P + i)).tolist()
                        for i in range(c)
                    ]
                    for policy in ("off", "async"):
                        t_warm = time.perf_counter()
                        concurrent_tokens_per_s(engine, prompts, policy, 2, device)  # warm-up (and this batch shape)
                        wait_idle(engine)
                        row[f"warmup_c{c}_{policy}_s"] = time.perf_counter() - t_warm  # a new shape: its compile
                        infos, calls = [], engine.stats.insert_calls
                        row[f"tokens_per_s_c{c}_{policy}"] = concurrent_tokens_per_s(
                            engine, prompts, policy, args.tokens, device, infos
                        )
                        if policy == "async":  # how many went in, and what each insertion cost the loop
                            inserts = [i["insert_s"] for i in infos if "insert_s" in i]
                            row[f"augmented_c{c}_async"] = sum(i.get("outcome") == "augmented" for i in infos)
                            row[f"augmented_steps_c{c}_async"] = sum(i["augmented"] for i in infos)  # the same, seen
                            # from the tokens: the last one came from an augmented cache
                            row[f"outcomes_c{c}_async"] = dict(
                                collections.Counter(str(i.get("outcome")) for i in infos)
                            )
                            # the decoder calls that inserted them (requests whose latents the loop found ready
                            # together, after as many tokens, share one)
                            row[f"insert_calls_c{c}_async"] = engine.stats.insert_calls - calls
                            took = [i["latents_s"] for i in infos if "latents_s" in i]
                            row[f"latents_s_c{c}_async"] = statistics.median(took) if took else None
                            row[f"insert_s_c{c}_async"] = statistics.median(inserts) if inserts else None
                            row[f"insert_total_s_c{c}_async"] = sum(inserts)
                        row[f"compiles_c{c}_{policy}"] = compiled_graphs()
                    if dynamic is not None:
                        row[f"tokens_per_s_c{c}_off_dynamic"] = concurrent_tokens_per_s(
                            dynamic, prompts, "off", args.tokens, device
                        )
                if engine.slab is not None:  # still replaying graphs after the batches grew the slab?
                    row["cuda_graphs_after_concurrency"] = engine.slab.cuda_graphs
                    row["graphs_recorded_after_concurrency"] = len(engine.slab.graphs)
            if dynamic is not None:
                dynamic.close()
            graphs = engine.worker.graphs  # coprocessor calls replayed as CUDA graphs so far, and their buckets
            row["coprocessor_graph_calls"] = graphs.calls if graphs is not None else 0
            row["coprocessor_graph_replays"] = graphs.replays if graphs is not None else 0
            row["coprocessor_graph_buckets"] = sorted(graphs.buckets) if graphs is not None else []
            if graphs is not None:  # the replayed call against the library's own compute_latents, same prompt
                row.update(graph_latents_check(model, graphs, ids, prompt))
            rows.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # after every row: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
        engine.close()
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "attn": base.config._attn_implementation,
        "compile_decode": args.compile_decode,
        "coprocessor_priority": args.coprocessor_priority,
        "coprocessor_graphs": args.coprocessor_graphs,
        "switch_interval_s": sys.getswitchinterval(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
