"""Probe: does torch's experimental ``caching_precompile`` (Dynamo's trace kept in the compile artifacts) remove what is
left of a cached first step? The artifacts of ``--compile-cache`` hold inductor's kernels and AOT-autograd's graphs, but
a fresh process still traces the model in Python (Dynamo) before it can use them.

Each case runs in its own process with its own empty inductor / Triton cache folders (what a fresh machine sees):
  save       compile the tiny model's training pass (forward + backward), save the artifacts
  load       the same configuration in a fresh process, the artifacts loaded first: first-call time, loss and gradient
             against eager (the loaded trace computes the same as a fresh compile?)
  other      another configuration (N_L + 1) loading the same artifacts: does torch recompile cleanly?
each with and without ``caching_precompile``.

    python experiments/precompile_probe.py --out precompile_probe.json     # CPU, about 5 minutes

Not adopted by the library (docs/performance.md, "Compile once"): on torch 2.13 the trace of a configuration that does
not fit makes the recompile fail, and Dynamo also keeps the trace in its on-disk cache, where a later run of another
configuration picks it up by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def case(mode: str, precompile: bool, cache: str, n_latents: int) -> dict:
    import torch

    torch._dynamo.config.caching_precompile = precompile
    from cacheaug import CoprocessorConfig, build_model
    from cacheaug.masks import stratified_positions
    from cacheaug.speed import load_compile_cache, save_compile_cache
    from cacheaug.testing import tiny_model

    torch.manual_seed(0)
    model = build_model(tiny_model("gemma3", "sdpa"), CoprocessorConfig(n_latents, 3, 4), check_finite=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 64), generator=g)
    positions = stratified_positions(2, 64 - 3, 4, 1, g)
    eager = model(ids, positions=positions).loss
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    loaded = load_compile_cache(cache) if mode != "save" else 0  # before torch.compile wraps the pass
    model.compile_training()
    t0 = time.perf_counter()
    try:
        loss = model(ids, positions=positions).loss
        loss.backward()
    except Exception as err:  # noqa: BLE001  what torch does with a stored trace that does not fit
        return {"mode": mode, "precompile": precompile, "error": f"{type(err).__name__}: {err}"[:300]}
    first = time.perf_counter() - t0
    grad_err = max(
        float((p.grad - e).abs().max() / e.abs().max().clamp_min(1e-12))
        for p, e in zip(model.trainable_parameters(), eager_grads)
    )
    from torch._dynamo.utils import counters

    return {
        "mode": mode,
        "precompile": precompile,
        "n_latents": n_latents,
        "first_call_s": round(first, 3),
        "loss_vs_eager": abs(loss.item() - eager.item()),
        "grad_rel_err_vs_eager": grad_err,
        "artifacts_loaded_bytes": loaded,
        "artifacts_saved_bytes": save_compile_cache(cache) if mode == "save" else 0,
        "frames_traced": counters["frames"].get("total", 0),
        "dynamo_cache": dict(counters.get("dynamo_cache", {})),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", nargs=4, default=None, help=argparse.SUPPRESS)  # mode precompile cache n_latents
    args = ap.parse_args()
    if args.case:
        mode, precompile, cache, n_latents = args.case
        print(json.dumps(case(mode, precompile == "1", cache, int(n_latents))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precompile in ("0", "1"):
            cache = str(Path(tmp) / f"cc{precompile}.bin")
            for mode, n_latents in (("save", 2), ("load", 2), ("other", 3)):
                fresh = Path(tmp) / f"{mode}{precompile}"  # empty compiler caches: a fresh machine
                env = {
                    **os.environ,
                    "TORCHINDUCTOR_CACHE_DIR": str(fresh / "inductor"),
                    "TRITON_CACHE_DIR": str(fresh / "triton"),
                }
                res = subprocess.run(
                    [sys.executable, __file__, "--case", mode, precompile, cache, str(n_latents)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
                row = (
                    json.loads(lines[-1])
                    if lines
                    else {
                        "mode": mode,
                        "precompile": precompile == "1",
                        "error": res.stderr.strip().splitlines()[-1][:300],
                    }
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    import torch

    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
