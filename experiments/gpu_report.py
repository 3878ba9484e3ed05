"""The GPU report of docs/results.md (issue 4) in three steps, each one device call of at most 10 minutes.

    python experiments/gpu_report.py prepare                    # model conversion + token files (once per machine)
    python experiments/gpu_report.py train --out $OUT            # every run below, concurrently on one GPU
    python experiments/gpu_report.py eval --tasks-dir T --out $OUT

``train`` sizes all runs to ONE step count (the same token budget for the method and every control) from the
step times that ``benchmarks/train_throughput.py --configs ...`` measured alone (``--calib``), so that the
concurrent runs fit ``--budget-s``; ``--max-minutes`` in each run is the safety net (a run that hits it says so
in its ``trainer_state.json``: ``stopped_early``). ``eval`` writes the per-offset perplexity change with bootstrap
intervals for every run (``cacheaug eval ppl``), the staleness study of the main run, and the downstream tasks
for the frozen model, the coprocessors and the controls (lm-eval when its dataset stack loads, else the same
metrics through :func:`cacheaug.tasks.score_tasks_directly`). Everything lands as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(os.environ.get("CACHEAUG_REPORT_DIR", "/tmp/cacheaug_report"))

# name -> (train options, the throughput benchmark's config name for its step time)
RUNS = {
    "nl16": ({"init": "copy", "n_latents": 16}, "copy:16"),  # the main run
    "nl4": ({"init": "copy", "n_latents": 4}, "copy:4"),
    "nl64": ({"init": "copy", "n_latents": 64}, "copy:64"),
    "pause16": ({"init": "pause", "n_latents": 16}, "pause:16"),
    "loradec": ({"init": "lora-decoder", "n_latents": 16, "lora_rank": 64, "lr": 3e-4}, "lora-decoder:16"),
    "scratch16": ({"init": "scratch", "n_latents": 16}, "scratch:16"),
    "lora16": ({"init": "lora", "n_latents": 16, "lora_rank": 64, "lr": 3e-4}, "lora:16"),
}
COMMON = {
    "model": "gemma-3-270m",
    "data": ["default"],
    "seq_len": 1024,
    "batch_size": 8,
    "n_traces": 16,
    "n_ahead": 16,
    "lr": 1e-4,
    "soft_token_lr": 1e-2,
    "eval_sequences": 32,
    "log_every": 10,
    "save_every": 0,
    "keep_last": 1,
    "seed": 0,
}
DOWNSTREAM = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "piqa",
    "boolq",
    "mmlu",
    "gsm8k",
    "minerva_math_algebra",
    "minerva_math_prealgebra",
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def prepare(args) -> None:
    from cacheaug.base import load_base_model
    from cacheaug.data import build_token_files

    t0 = time.perf_counter()
    _, tok = load_base_model("gemma-3-270m", device="cpu")  # converts the GGUF once into $CACHEAUG_HOME
    build_token_files(tok, ["default"], 1.0)
    print(f"prepare: model and token files ready in {time.perf_counter() - t0:.0f} s", flush=True)


def n_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def assign_gpus(times: dict[str, float], n: int) -> dict[str, int]:
    """Spread the runs over ``n`` GPUs, heaviest first onto the least loaded one."""
    load, out = [0.0] * max(1, n), {}
    for name in sorted(RUNS, key=lambda r: -times.get(RUNS[r][1], 1.0)):
        gpu = min(range(len(load)), key=load.__getitem__)
        out[name] = gpu
        load[gpu] += times.get(RUNS[name][1], 1.0)
    return out


def plan_steps(calib: Path | None, budget_s: float, gain: float, gpus: int = 1) -> tuple[int, dict, dict]:
    """One step count for every run, from the step times measured alone (the busiest GPU sets it); and the
    fastest variant's options."""
    from cacheaug.speed import parse_variant

    if calib is None or not calib.is_file():
        return 300, {}, {}  # the trainer's defaults
    bench = json.loads(calib.read_text())
    name = bench["best_variant"]
    v = parse_variant(name)
    variant = {
        "attn_implementation": v["attn"],
        **{k: v[k] for k in ("compile_mlp", "compile_masks", "compile_step", "trace_groups")},
    }
    times = {
        r["config"]: r["seconds_per_step"]
        for r in bench["rows"]
        if r.get("variant") == name and not r.get("loop") and r.get("K") == 16 and "seconds_per_step" in r
    }
    times = {cfg: times.get(cfg, max(times.values())) for _, cfg in RUNS.values()}
    placement = assign_gpus(times, gpus)
    busiest = max(sum(times[RUNS[r][1]] for r in RUNS if placement[r] == g) for g in set(placement.values()))
    steps = int(gain * budget_s / busiest) // 10 * 10
    return max(50, min(3000, steps)), variant, times


def train_all(args) -> None:
    gpus = n_gpus()
    steps, variant, times = plan_steps(Path(args.calib) if args.calib else None, args.budget_s, args.gain, gpus)
    placement = assign_gpus(times, gpus)
    if args.steps:
        steps = args.steps
    runs_dir = WORK / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "steps": steps,
        "tokens_per_run": steps * COMMON["batch_size"] * COMMON["seq_len"],
        "variant": variant,
        "step_times_alone_s": times,
        "budget_s": args.budget_s,
        "gain": args.gain,
        "gpus": gpus,
        "placement": placement,
        "runs": {},
    }
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    overrides = dict(kv.split("=", 1) for kv in args.set)
    for name, (opts, _) in RUNS.items():
        if args.only and name not in args.only:
            continue
        cfg = {
            **COMMON,
            **variant,
            **opts,
            **overrides,
            "out_dir": str(runs_dir / name),
            "max_steps": steps,
            "warmup_steps": max(10, steps // 10),
            "eval_every": max(10, steps // 5),
            "max_minutes": args.budget_s / 60,
        }
        plan["runs"][name] = cfg
        cmd = [sys.executable, "-m", "cacheaug", "train", *_train_cmd(cfg)]
        log = open(runs_dir / f"{name}.log", "w")
        run_env = {**env, "CUDA_VISIBLE_DEVICES": str(placement[name])} if gpus > 1 else env
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env), log)
    print(f"train: placement {placement}")
    print(
        f"train: {len(procs)} runs of {steps} steps ({plan['tokens_per_run'] / 1e6:.2f}M tokens each), "
        f"variant {variant}",
        flush=True,
    )
    deadline = time.time() + args.budget_s + args.grace_s
    while any(p.poll() is None for p, _ in procs.values()) and time.time() < deadline:
        time.sleep(5)
    for name, (p, _) in procs.items():
        if p.poll() is None:  # SIGTERM: the trainer evaluates nothing more but saves a checkpoint
            print(f"train: {name} still running at the deadline: SIGTERM", flush=True)
            p.send_signal(signal.SIGTERM)
    for name, (p, log) in procs.items():
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
    collect_runs(plan, runs_dir, Path(args.out))


def collect_runs(plan: dict, runs_dir: Path, out: Path) -> None:
    """One JSON with every run's plan, final state, metrics and log tail (the device returns at most 8 files)."""
    report = {**plan, "results": {}}
    for name in plan["runs"]:
        d = runs_dir / name
        ckpts = sorted(d.glob("step_*/trainer_state.json"))
        state = json.loads(ckpts[-1].read_text()) if ckpts else {}
        metrics = (
            [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            if (d / "metrics.jsonl").is_file()
            else []
        )
        log = (runs_dir / f"{name}.log").read_text(errors="replace") if (runs_dir / f"{name}.log").is_file() else ""
        report["results"][name] = {
            "checkpoint": str(ckpts[-1].parent) if ckpts else None,
            "step": state.get("step"),
            "tokens_seen": state.get("tokens_seen"),
            "stopped_early": state.get("stopped_early"),
            "metrics": metrics,
            "log_tail": log[-3000:],
        }
        last = [m for m in metrics if "loss" in m][-1:] or [{}]
        ev = [m for m in metrics if "eval_loss" in m][-1:] or [{}]
        print(
            f"{name:10s} step {state.get('step')} tokens {state.get('tokens_seen')} loss {last[0].get('loss')} "
            f"tok/s {last[0].get('tokens_per_s')} eval offsets 1/4/16: "
            f"{[round(ev[0].get(f'eval_rel_ppl_offset_{o}', float('nan')), 1) for o in (1, 4, 16)]}",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_runs.json").write_text(json.dumps(report, indent=1) + "\n")


def _final_checkpoints() -> dict[str, str]:
    out = {}
    for name in RUNS:
        ckpts = sorted((WORK / "runs" / name).glob("step_*/trainer_state.json"))
        if ckpts:
            out[name] = str(ckpts[-1].parent)
    return out


def downstream(args) -> None:
    """One model on the downstream tasks: lm-eval when its dataset stack loads, else the direct scorer."""
    import torch

    from cacheaug.base import load_base_model
    from cacheaug.lm_eval_model import CacheAugEvalLM
    from cacheaug.tasks import score_tasks_directly

    base, tok = load_base_model("gemma-3-270m", attn_implementation="sdpa")
    lm = CacheAugEvalLM(coprocessor=args.ckpt, base=base, tokenizer=tok)
    folder = Path(args.tasks_dir)
    names = [t for t in DOWNSTREAM if (folder / f"{t}.jsonl").is_file()]
    t0 = time.perf_counter()
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        task_names = [f"cacheaug_{t}" if (folder / f"{t}.yaml").is_file() else f"cacheaug_{t}_bpb" for t in names]
        res = simple_evaluate(
            model=lm, tasks=task_names, task_manager=TaskManager(include_path=str(folder)), log_samples=False
        )
        results, how = res["results"], "lm_eval.simple_evaluate"
    except ImportError as err:
        print(f"downstream: lm-eval cannot load its datasets ({err}); scoring directly", flush=True)
        results, how = score_tasks_directly(lm, folder, names), "cacheaug.tasks.score_tasks_directly"
    out = {
        "name": args.name,
        "checkpoint": args.ckpt,
        "scored_by": how,
        "seconds": round(time.perf_counter() - t0),
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.out_json).write_text(json.dumps(out, indent=1, default=str) + "\n")


def eval_all(args) -> None:
    from cacheaug.evaluate import evaluate_ppl, evaluate_staleness

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = _final_checkpoints()
    print(f"eval: checkpoints {ckpts}", flush=True)
    # downstream tasks: one process per model, concurrently, while this process does perplexity and staleness
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(WORK / "hf_datasets"),
    }
    procs = {}
    gpus = n_gpus()
    if args.tasks_dir:
        for i, name in enumerate(["frozen", *[n for n in args.downstream if n in ckpts]]):
            cmd = [
                sys.executable,
                __file__,
                "downstream",
                "--name",
                name,
                "--tasks-dir",
                args.tasks_dir,
                "--out-json",
                str(WORK / f"ds_{name}.json"),
            ]
            if name != "frozen":
                cmd += ["--ckpt", ckpts[name]]
            log = open(WORK / f"ds_{name}.log", "w")
            run_env = {**env, "CUDA_VISIBLE_DEVICES": str((i + 1) % gpus)} if gpus > 1 else env
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env), log)
    t0 = time.perf_counter()
    try:
        evaluate_ppl(
            list(ckpts.values()),
            sequences=args.sequences,
            stride=args.stride,
            n_boot=1000,
            seq_len=args.seq_len,
            out=str(out / "ppl.json"),
        )
    except Exception as err:  # keep going: the other parts are independent
        print(f"eval: ppl failed: {type(err).__name__}: {err}", flush=True)
    print(f"eval: ppl done in {time.perf_counter() - t0:.0f} s", flush=True)
    if "nl16" in ckpts:
        try:
            evaluate_staleness(
                ckpts["nl16"],
                delays=(0, 4, 16, 64),
                offsets=(1, 2, 4, 8, 16),
                sequences=args.stale_sequences,
                points=16,
                seq_len=args.seq_len,
                out=str(out / "stale.json"),
            )
        except Exception as err:
            print(f"eval: staleness failed: {type(err).__name__}: {err}", flush=True)
    print(f"eval: staleness done at {time.perf_counter() - t0:.0f} s", flush=True)
    deadline = time.time() + args.downstream_timeout_s
    while any(p.poll() is None for p, _ in procs.values()) and time.time() < deadline:
        time.sleep(3)
    downstream_results = {}
    for name, (p, log) in procs.items():
        if p.poll() is None:
            p.kill()
            print(f"eval: downstream {name} timed out", flush=True)
        log.close()
        f = WORK / f"ds_{name}.json"
        downstream_results[name] = (
            json.loads(f.read_text())
            if f.is_file()
            else {"error": (WORK / f"ds_{name}.log").read_text(errors="replace")[-2000:]}
        )
    (out / "downstream.json").write_text(json.dumps(downstream_results, indent=1) + "\n")
    for name, r in downstream_results.items():
        res = r.get("results", {})
        print(
            name,
            r.get("scored_by"),
            r.get("seconds"),
            {
                k: round(v.get("acc,none", v.get("bits_per_byte,none", float("nan"))), 3)
                for k, v in res.items()
                if isinstance(v, dict)
            }
            or r.get("error", "")[-300:],
            flush=True,
        )


def _train_cmd(cfg: dict) -> list[str]:
    cmd = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            cmd.append(_flag(k) if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, list):
            cmd += [_flag(k), *map(str, v)]
        else:
            cmd += [_flag(k), str(v)]
    return cmd


def ddp_check(args) -> None:
    """The main run's config on one GPU (batch B) and under torchrun on two (B/2 each: the same global batch and
    the same sequences): loss curves side by side, and the throughput of each."""
    import torch

    _, variant, _ = plan_steps(Path(args.calib) if args.calib else None, 1.0, 1.0)
    cfg = {
        **COMMON,
        **variant,
        **RUNS["nl16"][0],
        "max_steps": args.steps,
        "warmup_steps": 10,
        "log_every": 5,
        "eval_every": 0,
        "eval_sequences": 8,
        "max_minutes": args.max_minutes,
        **dict(kv.split("=", 1) for kv in args.set),
    }
    out, report = Path(args.out), {"steps": args.steps, "variant": variant, "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false"}
    world = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2  # CPU: gloo (smoke runs)
    for name, nproc in (("one_gpu", 1), (f"{world}_gpus", world)):
        d = WORK / "ddp" / name
        run = {**cfg, "out_dir": str(d), "batch_size": int(cfg["batch_size"]) // nproc}
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                "-m",
                "cacheaug",
            ]
            if nproc > 1
            else [sys.executable, "-m", "cacheaug"]
        )
        t0 = time.perf_counter()
        p = subprocess.run(
            [*launcher, "train", *_train_cmd(run)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=args.timeout_s,
        )
        metrics = (
            [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            if (d / "metrics.jsonl").is_file()
            else []
        )
        report["runs"][name] = {
            "world": nproc,
            "batch_per_gpu": run["batch_size"],
            "wall_s": round(time.perf_counter() - t0),
            "returncode": p.returncode,
            "metrics": metrics,
            "log_tail": (p.stdout + p.stderr)[-2500:],
        }
        losses = [(m["step"], round(m["loss"], 4), round(m.get("tokens_per_s", 0))) for m in metrics if "loss" in m]
        print(f"ddp: {name} rc={p.returncode} (step, loss, tok/s): {losses}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp.json").write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").set_defaults(func=prepare)
    tr = sub.add_parser("train")
    tr.add_argument("--calib", default=str(WORK / "tp.json"), help="train_throughput.py --configs output")
    tr.add_argument("--budget-s", type=float, default=450, help="seconds of concurrent training")
    tr.add_argument("--gain", type=float, default=1.3, help="assumed speed-up of running the runs concurrently")
    tr.add_argument("--grace-s", type=float, default=60, help="time after the budget for the final eval and save")
    tr.add_argument("--steps", type=int, default=0, help="override the planned step count")
    tr.add_argument("--only", nargs="*", default=None, help="a subset of the runs")
    tr.add_argument("--set", nargs="*", default=[], help="override training options, e.g. seq_len=128 (smoke runs)")
    tr.add_argument("--out", required=True)
    tr.set_defaults(func=train_all)
    ev = sub.add_parser("eval")
    ev.add_argument("--tasks-dir", default=None, help="task folder written by `cacheaug eval tasks --max-docs N`")
    ev.add_argument("--downstream", nargs="*", default=["nl4", "nl16", "nl64", "pause16", "loradec"])
    ev.add_argument("--downstream-timeout-s", type=float, default=420)
    ev.add_argument("--sequences", type=int, default=64)
    ev.add_argument("--stride", type=int, default=16)
    ev.add_argument("--seq-len", type=int, default=1024)
    ev.add_argument("--stale-sequences", type=int, default=16)
    ev.add_argument("--out", required=True)
    ev.set_defaults(func=eval_all)
    dd = sub.add_parser("ddp")
    dd.add_argument("--calib", default=str(WORK / "tp.json"))
    dd.add_argument("--steps", type=int, default=100)
    dd.add_argument("--max-minutes", type=float, default=2.0)
    dd.add_argument("--timeout-s", type=float, default=200)
    dd.add_argument("--set", nargs="*", default=[], help="override training options (smoke runs)")
    dd.add_argument("--out", required=True)
    dd.set_defaults(func=ddp_check)
    ds = sub.add_parser("downstream")
    ds.add_argument("--name", required=True)
    ds.add_argument("--ckpt", default=None)
    ds.add_argument("--tasks-dir", required=True)
    ds.add_argument("--out-json", required=True)
    ds.set_defaults(func=downstream)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
