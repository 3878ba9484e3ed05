"""Does the engine loop starve a coprocessor call through the interpreter alone? (CPU, GPU stand-ins.)

On the H200 an async request's coprocessor call took 78-512 ms while the engine loop decoded beside it, against 40-83 ms
for the whole sync augmentation alone (docs/performance.md, "Session 17"). This separates the interpreter from the GPU: the engine runs on the CPU with the
tiny test model, its decoding step followed by a 1.5 ms wait with the GIL released (what a step that waits for the GPU
does), and a coprocessor call of ``--ops`` small tensor ops with the GIL held (its kernel launches) followed by a 30 ms
wait with the GIL released (its device time). The call's time is measured alone and beside async requests of
``--tokens`` tokens, split as the engine reports it (queued / launch / device).

    python experiments/loop_contention_cpu.py --out results/speed17/loop_contention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.serving import Engine
from cacheaug.serving.slab import Slab
from cacheaug.testing import perturb_trainable, tiny_model

PARTS = ("latents_s", "queued_s", "launch_s", "device_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=2000, help="small ops per coprocessor call (its launches)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model = CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(model, scale=1.0)
    real_step, real_latents = Slab.step, model.compute_latents

    def step(self, rows, tokens, positions):  # then "wait for the GPU" without the GIL
        out = real_step(self, rows, tokens, positions)
        time.sleep(0.0015)
        return out

    def latents(*a, **k):
        x = torch.zeros(8)
        for _ in range(args.ops):  # "kernel launches": the GIL held
            x = x + 1
        time.sleep(0.03)  # "device time": the GIL released
        return real_latents(*a, **k)

    Slab.step = step
    model.compute_latents = latents
    engine = Engine(model, default_deadline_s=60, max_stale_tokens=10**6)
    prompt = list(range(3, 40))
    alone = []
    for _ in range(args.repeats):
        t = time.monotonic()
        future = engine.submit_latents(engine.prefill(prompt)[0], len(prompt), prompt[-1])
        future.result()
        alone.append({"latents_s": time.monotonic() - t, **future.timing})
    beside = []
    for _ in range(args.repeats):
        while not engine.worker.idle():
            time.sleep(0.01)
        info: dict = {}
        t = time.monotonic()
        steps = list(engine.stream(prompt, args.tokens, policy="async", info=info))
        beside.append(
            {
                **{k: info.get(k) for k in PARTS},
                "request_s": time.monotonic() - t,
                "step_s": (time.monotonic() - t) / len(steps),
                "inserted_after": steps[-1].inserted_after,
            }
        )
    engine.close()
    med = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)  # noqa: E731
    result = {
        "torch": torch.__version__,
        "ops": args.ops,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "alone": {k: med(alone, k) for k in PARTS},
        "beside_decoding": {k: med(beside, k) for k in (*PARTS, "request_s", "step_s")},
        "inserted_after_tokens": [r["inserted_after"] for r in beside],
    }
    result["slowdown"] = round(result["beside_decoding"]["latents_s"] / result["alone"]["latents_s"], 3)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
