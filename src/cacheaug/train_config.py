"""What a training run needs, in sections: :class:`TrainConfig` holds the decoder's name, the device and the seed, and
one section per concern, each a frozen dataclass whose fields are ``cacheaug train`` options of the same name:

- ``coprocessor``: :class:`~cacheaug.config.CoprocessorConfig` itself (N_L, N_A, K, the arm, its levers);
- ``dataset``: :class:`DataConfig` (text sources, split, sequence length, batch, where traces go);
- ``optim``: :class:`OptimConfig` (steps, time budget, learning rates, schedule, clipping);
- ``speed``: :class:`SpeedConfig` (precision, attention, compiled step, trace kernels, compile cache);
- ``checkpoint``: :class:`CheckpointConfig` (output folder, evaluation, logging, saving, resume);
- ``distributed``: :class:`DistributedConfig` (DDP or FSDP2 under torchrun).

The command line, YAML files (``--config``) and a run's ``run_config.json`` stay flat: one key per option, as
before sections existed (:meth:`TrainConfig.from_flat`, :meth:`TrainConfig.to_dict`); a YAML file may also group
its keys by section (``optim: {lr: 3e-4}``). Each builder takes its section: the optimizer ``cfg.optim``, the speed
options ``cfg.speed`` (:func:`cacheaug.speed.apply_speed_options`), the model ``cfg.coprocessor``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .arms import ARMS
from .config import CoprocessorConfig, _f


@dataclass(frozen=True)
class DataConfig:
    """What it trains on: sources, split, packing and where the traces go."""

    data: tuple[str, ...] = _f(("default",), "text sources: 'default', files/folders (.txt .jsonl .parquet), hf:NAME")
    seq_len: int = _f(1024, "T, tokens per packed training sequence")
    batch_size: int = _f(8, "sequences per device per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    heldout_pct: float = _f(1.0, "percent of documents held out (by hash) for evaluation")
    adapt_pct: float = _f(
        0.0,
        "percent of the other documents kept for `cacheaug adapt` (by hash): the coprocessor "
        "never trains on them; use the same value for adapt, train and eval",
    )
    heldout_sources: tuple[str, ...] = _f(
        (),
        "whole sources kept out of training and evaluated as unseen (default "
        "corpus parts: sotu pydoc gcide nlp moby jargon debref; or paths)",
    )
    insertion: Literal["random", "marker", "answer"] = _f(
        "random",
        "where traces are inserted: 'random' (uniform, the paper), 'marker' (right after each occurrence "
        "of --marker, e.g. the answer marker of `cacheaug data synth` text; random points fill up to K) or 'answer' "
        "(the marker and after every answer token up to the line's end: deliberating before each answer token; "
        "K of them per sequence)",
    )
    marker: str = _f(" Answer:", "the text after which --insertion marker / answer inserts")

    def splits(self):
        from .data import Splits

        return Splits(self.heldout_pct, self.adapt_pct, tuple(self.heldout_sources))


@dataclass(frozen=True)
class OptimConfig:
    """How long and how fast: steps, time budget, AdamW's learning rates, the schedule, clipping."""

    max_steps: int = _f(1000, "optimizer steps")
    max_minutes: float = _f(
        0.0,
        "stop (evaluate, save) after this much training time even before max_steps (0 = "
        "no limit); checked at log steps, so runs on shared machines end in time",
    )
    lr: float = _f(1e-4, "peak AdamW learning rate of the coprocessor weights")
    soft_token_lr: float = _f(
        1e-2,
        "peak learning rate of the soft tokens and the read-out scale (they live at the "
        "scale of the input embeddings, about 1 per element for Gemma)",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay (coprocessor weights only)")
    warmup_steps: int = _f(100, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak (1: constant after the warm-up)")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 = off)")

    def lr_multiplier(self, step: int) -> float:
        """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class SpeedConfig:
    """Precision and the opt-in speed settings (each trains exactly what the eager step does; docs/performance.md)."""

    dtype: Literal["auto", "bfloat16", "float32"] = _f(
        "auto", "decoder weights; bf16 on GPU runs under autocast with fp32 coprocessor master weights"
    )
    attn_implementation: str | None = _f(None, "sdpa (default), flex_attention or eager")
    compile_mlp: bool = _f(False, "torch.compile the MLP blocks of decoder and coprocessor (GPU speed; cacheaug.speed)")
    compile_masks: bool = _f(False, "build FlexAttention block masks with a compiled create_block_mask (GPU speed)")
    compile_step: Literal["off", "step", "graphs"] = _f(
        "off",
        "torch.compile the whole training pass as one graph ('step'), plus CUDA graphs ('graphs'; GPU); the "
        "first step compiles (minutes for a real model); see docs/performance.md",
    )
    keep_logits: bool = _f(
        False,
        "keep the loss's logits (targets x vocab) for backward instead of recomputing them: "
        "one LM-head product less per step, about 1 GiB more at batch 8 (GPU speed)",
    )
    trace_groups: int = _f(
        1,
        "G > 1 draws the K insertion points stratified (K/G in each of G equal segments of the "
        "sequence) so that each group's passes read only the text before its segment's end: less "
        "attention work, same losses for those points (GPU speed; docs/performance.md)",
    )
    trace_chunk: int = _f(
        0,
        "C > 0 runs the trace passes C traces per row against a copy of the text keys instead of "
        "all K traces in one row: less attention work at large K, same losses (GPU speed; "
        "docs/performance.md)",
    )
    trace_windows: bool = _f(
        False,
        "sliding-window layers of the trace passes read only the W-1 text keys before each "
        "trace (one trace per row; full layers: --trace-chunk traces per row): less attention "
        "work, same losses; sdpa with Gemma-3 or Qwen-2/3 (GPU speed; docs/performance.md)",
    )
    trace_kernel: bool = _f(
        False,
        "--trace-windows through cacheaug's own attention kernel (Triton on CUDA): text keys "
        "read in place instead of copied per trace, no gradient computed for them; same losses "
        "(implies --trace-windows; fastest without --trace-chunk; tile sizes from "
        "CACHEAUG_TRACE_KERNEL_TILES; docs/performance.md)",
    )
    rope_table: bool = _f(
        False,
        "rotary cos/sin looked up in a table of every position instead of computed per "
        "call (in the compiled step: per element in every layer); same values (GPU speed; "
        "docs/performance.md)",
    )
    compile_cache: str | None = _f(
        None,
        "a file of torch.compile artifacts: loaded before the first step if it exists, written after it; carry "
        "it to the next process or machine to skip most of the compile; a name ending in .xz is compressed (about 13x) "
        "(docs/performance.md)",
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run goes and how often it looks at itself: evaluation, logs, checkpoints, resume."""

    out_dir: str = _f("runs/cacheaug", "where checkpoints, logs and the resolved config go")
    eval_every: int = _f(200, "steps between held-out evaluations (0 = only at the end)")
    eval_sequences: int = _f(32, "held-out sequences per evaluation")
    log_every: int = _f(10, "steps between log lines (the only host syncs of the loop)")
    save_every: int = _f(500, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(
        3,
        "checkpoints kept (each holds the weights and twice as much optimizer state: `cacheaug "
        "export` writes a weights-only copy for sharing)",
    )
    resume: bool = _f(True, "continue from the newest complete checkpoint in out_dir")


@dataclass(frozen=True)
class DistributedConfig:
    """Several processes (torchrun)."""

    parallel: Literal["ddp", "fsdp"] = _f(
        "ddp",
        "under torchrun: replicate the coprocessor (ddp) or shard it per "
        "layer with FSDP2 (fsdp: for coprocessors that do not fit one device)",
    )


SECTIONS: dict[str, type] = {
    "coprocessor": CoprocessorConfig,
    "dataset": DataConfig,
    "optim": OptimConfig,
    "speed": SpeedConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs: the decoder, device and seed, and one section per concern (the module's
    docstring). Build it from flat options with :meth:`from_flat` (``TrainConfig.from_flat(lr=3e-4, n_latents=32)``);
    a flat option can also be read as an attribute (``cfg.lr`` is ``cfg.optim.lr``)."""

    model: str = _f("gemma-3-270m", "frozen decoder: 'gemma-3-270m' (offline default) or an HF id / folder")
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    seed: int = _f(0, "seed for data order, insertion points and init")
    coprocessor: CoprocessorConfig = field(default_factory=CoprocessorConfig, metadata={"section": True})
    dataset: DataConfig = field(default_factory=DataConfig, metadata={"section": True})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"section": True})
    speed: SpeedConfig = field(default_factory=SpeedConfig, metadata={"section": True})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"section": True})
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata={"section": True})

    # -------------------------------------------------------------------------------- flat options <-> sections
    @classmethod
    def flat_fields(cls) -> list[tuple[str | None, dataclasses.Field]]:
        """``(section or None, field)`` of every option, in the order ``--help`` lists them."""
        out = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("section"):
                section = SECTIONS[f.name]
                out += [(f.name, g) for g in dataclasses.fields(section) if g.metadata.get("flag", True)]
            else:
                out.append((None, f))
        return out

    @classmethod
    def from_flat(cls, **options: Any) -> TrainConfig:
        """A config from flat options (the command line's, a YAML file's, an old ``run_config.json``'s); every
        problem found is reported at once."""
        where = {f.name: section for section, f in cls.flat_fields()}
        unknown = sorted(set(options) - set(where))
        if unknown:
            raise TypeError(f"unknown training options {unknown}")
        problems = _problems({**{f.name: f.default for _, f in cls.flat_fields() if _has_default(f)}, **options})
        if problems:
            raise ValueError("Invalid training options:\n  " + "\n  ".join(problems))
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        top = {}
        tuples = {f.name for _, f in cls.flat_fields() if isinstance(f.default, tuple)}
        for name, value in options.items():
            value = tuple(value) if name in tuples and isinstance(value, list) else value  # (JSON has lists)
            (parts[where[name]] if where[name] else top)[name] = value
        parts["coprocessor"]["init_seed"] = options.get("seed", 0)
        return cls(**top, **{name: SECTIONS[name](**values) for name, values in parts.items()})

    def __post_init__(self) -> None:
        problems = _problems(self.to_dict())
        if problems:
            raise ValueError("Invalid training options:\n  " + "\n  ".join(problems))
        if self.coprocessor.init_seed != self.seed:
            object.__setattr__(self, "coprocessor", dataclasses.replace(self.coprocessor, init_seed=self.seed))

    def to_dict(self) -> dict:
        """The flat options (what ``run_config.json`` and a YAML file hold)."""
        d = {}
        for section, f in self.flat_fields():
            value = getattr(getattr(self, section) if section else self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with some flat options changed."""
        return type(self).from_flat(**{**self.to_dict(), **options})

    def __getattr__(self, name: str):  # a flat option read from its section (cfg.lr -> cfg.optim.lr)
        section = _FLAT_SECTION.get(name)
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    def coprocessor_config(self) -> CoprocessorConfig:
        return self.coprocessor

    def splits(self):
        return self.dataset.splits()


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


_FLAT_SECTION = {f.name: section for section, f in TrainConfig.flat_fields() if section}


def _problems(o: dict) -> list[str]:
    """Every problem of a set of flat options, in words a user can act on (option names as flags)."""
    problems = []
    if o["max_minutes"] < 0:
        problems.append(f"--max-minutes must be >= 0 (0 = no limit), got {o['max_minutes']}")
    for name in (
        "n_latents",
        "n_ahead",
        "n_traces",
        "seq_len",
        "batch_size",
        "grad_accum",
        "max_steps",
        "eval_sequences",
        "log_every",
        "keep_last",
        "lora_rank",
    ):
        if o[name] < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {o[name]}")
    if o["seq_len"] < o["n_traces"] + o["n_ahead"]:
        problems.append(
            f"--seq-len {o['seq_len']} is too short for --n-traces {o['n_traces']} insertion points with "
            f"--n-ahead {o['n_ahead']} targets each: use --seq-len >= {o['n_traces'] + o['n_ahead']}"
        )
    for name, value in o.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("lr", "soft_token_lr"):
        if not o[name] > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if not 0 < o["heldout_pct"] < 100:
        problems.append(f"--heldout-pct must be in (0, 100), got {o['heldout_pct']}")
    if not 0 <= o["adapt_pct"] < 100:
        problems.append(f"--adapt-pct must be in [0, 100), got {o['adapt_pct']}")
    if o["insertion"] in ("marker", "answer") and not o["marker"]:
        problems.append(f"--insertion {o['insertion']} needs a non-empty --marker")
    if not o["data"]:
        problems.append("--data needs at least one source")
    if o["parallel"] == "fsdp" and o["init"] in ARMS and not ARMS[o["init"]].shards:
        problems.append(
            f"--parallel fsdp shards a coprocessor's own weights; init={o['init']} shares the "
            "decoder's and trains only small adapters: use --parallel ddp"
        )
    if o["trace_groups"] < 1 or o["n_traces"] % o["trace_groups"]:
        problems.append(f"--trace-groups {o['trace_groups']} must be a positive divisor of --n-traces {o['n_traces']}")
    elif o["trace_chunk"] < 0 or (o["trace_chunk"] and (o["n_traces"] // o["trace_groups"]) % o["trace_chunk"]):
        problems.append(
            f"--trace-chunk {o['trace_chunk']} must divide the traces of each trace group "
            f"({o['n_traces'] // o['trace_groups']}), or be 0 (off)"
        )
    if not problems:
        names = [f.name for f in dataclasses.fields(CoprocessorConfig) if f.metadata.get("flag", True)]
        try:
            CoprocessorConfig(**{n: o[n] for n in names}, init_seed=o.get("seed", 0))
        except ValueError as err:
            problems += [line.strip().replace("`", "--").replace("_", "-") for line in str(err).splitlines()[1:]]
    return problems
