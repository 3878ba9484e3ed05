"""The cost of isolating the coprocessor in its own process (issue "serving engine v2").

In its own process, a CUDA fault of the coprocessor (an illegal access poisons the whole CUDA context) would leave
the decoder's process serving, unaugmented. This measures what the isolation costs per call, on a prompt's
kv-cache, against the coprocessor on a thread of the decoder's process (what the engine does today):

  in_process_s      ``compute_latents`` in the decoder's process, on its own CUDA stream as in the engine (median of
                    --repeats after a warm-up)
  separate_s        the same call through a child process: the cache handed over through a
                    ``torch.multiprocessing`` queue (CUDA IPC handles on a GPU, shared memory on the CPU: the
                    tensors are not copied), the latents handed back and copied; median round trip
  overhead_s        separate_s - in_process_s, and overhead_pct of in_process_s
  child_start_s     starting the child and loading its copy of the model (once, and again after each replacement)
  child_weights_gib the child's own weights (decoder and coprocessor; the decoder's process keeps its own)
  max_abs_diff      latents of the child against the decoder's process (the same weights: 0 up to kernels)
  *_beside_decoding_s   the same two calls while another thread decodes without pause (the engine's slab step at
                    batch 1, its token read to the host each step, as the engine loop does): what a call costs beside a
                    busy engine loop, in the process (sharing the interpreter and the GPU) and in the child (sharing
                    the GPU only); decode_step_s and decode_step_beside_*_s: that thread's step alone and meanwhile

    python benchmarks/coprocessor_process.py --prompt-len 1024 --latents 16 --out proc.json
    python benchmarks/coprocessor_process.py --model tiny --device cpu --prompt-len 32 --latents 2   # CPU smoke run

``--compile-decode inductor`` compiles that decoding step as ``cacheaug serve --compile-decode`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from transformers import DynamicCache

from cacheaug import CacheAugmentedLM, CoprocessorConfig, kv, load_base_model
from cacheaug.serving.slab import Slab
from cacheaug.testing import perturb_trainable, tiny_model


def build(model_name: str, device: str, n_latents: int) -> CacheAugmentedLM:
    if model_name == "tiny":
        model = CacheAugmentedLM(tiny_model("gemma3", device=device), CoprocessorConfig(n_latents=n_latents))
        perturb_trainable(model, scale=1.0)  # seeded: the child's copy gets the same weights
        return model
    base, _ = load_base_model(model_name, device=device)
    return CacheAugmentedLM(base, CoprocessorConfig(n_latents=n_latents))  # copy init: the same weights in both


def child(model_name: str, device: str, n_latents: int, inbox, outbox) -> None:
    """The coprocessor's process: a cache in, its latents out, until None."""
    with torch.no_grad():
        model = build(model_name, device, n_latents)
        outbox.put(sum(p.numel() * p.element_size() for p in model.parameters()))
        latents = None  # kept alive until the next request: the parent reads it through its IPC handle
        while (item := inbox.get()) is not None:
            layers, length, last = item
            latents = model.compute_latents(kv.from_layers(layers), length, torch.tensor([last], device=device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            outbox.put(latents)


class Decoding:
    """A thread that decodes without pause on a copy of the prompt's cache, one token per step read to the host (the
    engine loop's work at batch 1), while the ``with`` block runs."""

    def __init__(self, model, cache, token: int, compile_decode: str | None):
        self.slab = Slab(model, 1, max_length=4 * kv.length(cache), compile=compile_decode)
        self.cache, self.token, self.steps, self.seconds = cache, token, 0, 0.0
        self.row = self.slab.adopt(cache)
        self.stop = threading.Event()

    def _step(self) -> None:
        slab, row = self.slab, self.row
        if slab.length[row] > 2 * kv.length(self.cache):  # keep the row at about the prompt's length
            slab.release(row)
            self.row = row = slab.adopt(self.cache)
        self.token = int(slab.step([row], [self.token], [slab.length[row]]).argmax(-1))

    def step_time(self, n: int) -> float:
        for _ in range(3):
            self._step()  # records (and compiles) the step
        t = time.perf_counter()
        for _ in range(n):
            self._step()
        return (time.perf_counter() - t) / n

    def _run(self) -> None:
        with torch.no_grad():
            t = time.perf_counter()
            while not self.stop.is_set():
                self._step()
                self.steps += 1
            self.seconds = time.perf_counter() - t

    def __enter__(self):
        self.stop.clear()
        self.steps, self.seconds = 0, 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def mean_step(self) -> float:
        return self.seconds / max(1, self.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m' or 'tiny'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile-decode", default=None, help="torch.compile the decoding thread's step (e.g. inductor)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_grad_enabled(False)
    model = build(args.model, args.device, args.latents)
    vocab = model.base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    cache = DynamicCache()
    model.base.get_decoder()(input_ids=ids, **model.cache_kwargs(cache))
    layers, last = kv.layers(cache), int(ids[0, -1])

    side = torch.cuda.Stream(device) if device.type == "cuda" else None  # its own stream, as the engine's worker

    def in_process():
        if side is None:
            return model.compute_latents(cache, args.prompt_len, ids[:, -1])
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = model.compute_latents(cache, args.prompt_len, ids[:, -1])
        side.synchronize()
        return out

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=child, args=(args.model, args.device, args.latents, inbox, outbox), daemon=True)
    proc.start()
    child_bytes = outbox.get(timeout=600)
    child_start = time.perf_counter() - t0

    def separate():
        inbox.put((layers, args.prompt_len, last))
        got = outbox.get(timeout=120)
        out = got.clone()  # our own copy: the child's tensor is reused
        sync()
        del got
        return out

    def timed(fn):
        result = fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), result

    t_in, lat_in = timed(in_process)
    t_sep, lat_sep = timed(separate)
    decoding = Decoding(model, cache, int(ids[0, -1]), args.compile_decode)
    step_alone = decoding.step_time(50)
    with decoding:
        t_in_busy, _ = timed(in_process)
    step_in = decoding.mean_step()
    with decoding:
        t_sep_busy, _ = timed(separate)
    step_sep = decoding.mean_step()
    inbox.put(None)
    proc.join(timeout=60)
    row = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "prompt_len": args.prompt_len,
        "n_latents": args.latents,
        "in_process_s": round(t_in, 6),
        "separate_s": round(t_sep, 6),
        "overhead_s": round(t_sep - t_in, 6),
        "overhead_pct": round(100 * (t_sep / t_in - 1), 1),
        "child_start_s": round(child_start, 2),
        "child_weights_gib": round(child_bytes / 2**30, 3),
        "max_abs_diff": float((lat_in.float() - lat_sep.float()).abs().max()),
        "compile_decode": args.compile_decode,
        "decode_step_s": round(step_alone, 6),
        "in_process_beside_decoding_s": round(t_in_busy, 6),
        "decode_step_beside_in_process_s": round(step_in, 6),
        "separate_beside_decoding_s": round(t_sep_busy, 6),
        "decode_step_beside_separate_s": round(step_sep, 6),
    }
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
