"""Configuration of a cache coprocessor (the trainable half of a cache-augmented model).

Symbols follow the paper (arXiv 2412.17747, section 2):
  N_L = ``n_latents``  latent embeddings the coprocessor writes into the cache per insertion
  N_A = ``n_ahead``    real tokens after the insertion point whose loss trains it
  K   = ``n_traces``   insertion points ("traces") trained in one parallel pass per sequence
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .arms import arm_names, get_arm

POSITION_SCHEMES = ("shifted", "shared", "overlap")


def _f(default, help: str, **kw):
    """A config field with the help text (and options) of its command-line flag in its metadata."""
    return field(default=default, metadata={"help": help, **kw})


READOUTS = ("final_norm", "pre_norm")


@dataclass(frozen=True)
class CoprocessorConfig:
    """Shape and initialisation of the coprocessor.

    Args:
        n_latents: N_L, latent embeddings appended to the cache per augmentation (paper: 8-64).
        n_ahead: N_A, teacher-forced real tokens after the insertion point that carry the loss;
            offset 1 is predicted by the last latent, offset j > 1 by ahead token j - 1 (paper: 16).
        n_traces: K, insertion points sampled per training sequence when none are given (paper: 128).
        init: the arm (:mod:`cacheaug.arms`): "copy" (the decoder's weights, fully trainable: the paper's default), "lora"
            (rank-r adapters over the decoder's frozen weights, shared in memory) or "scratch"
            (random init with the decoder's architecture). "pause" is the pause-token control: no
            backbone, the N_L trainable soft tokens themselves are inserted (context-free), same data path.
            "lora-decoder" is the LoRA-tuned-decoder control: no latents; rank-r adapters on (a copy of the
            module tree of) the decoder itself, trained on the same target tokens.
        lora_rank: rank r of the adapters when ``init="lora"`` (paper ablations: 64, 128).
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_rank); None means lora_rank.
        init_seed: seed for the soft-token choice and the scratch weights, so builds are repeatable.

    Levers the paper leaves open (defaults = this project's reading of the paper; docs/results.md measures each):

        position_scheme: rotary positions of an insertion after token p. "shifted" (default): latents at
            p+1..p+N_L, the text continues at p+N_L+1 (plain HF decoding from the augmented cache). "shared": every
            latent at position p, the text keeps its own positions p+1, p+2, ... . "overlap": latents at
            p+1..p+N_L, the text keeps its own positions. Masks (and sliding windows) always follow the order of
            the entries in the cache; only the rotary positions change.
        reread_last: after the latents, feed token p again (at position p, or p+N_L+1 when shifted), so that
            offset 1 is predicted by a real token that attends to the latents instead of by the last latent.
        echo_residual: latent i = token p's input embedding + scale * read-out_i, with the scale starting at 0:
            the untrained coprocessor inserts copies of token p (a neutral start: the insertion-cost diagnostic's
            cheapest latents) and learns a change from there.
        readout: "final_norm" (default): the backbone's last hidden state after its final norm; "pre_norm":
            before it (the residual stream), with the same learned scale.
        offset_decay: training-loss weight of offset o proportional to offset_decay**(o-1), normalised to mean 1
            (1.0, the default, is the paper's uniform mean over the N_A offsets; < 1 stresses the near offsets).

    >>> CoprocessorConfig(n_latents=16, n_ahead=16, n_traces=16).init
    'copy'
    """

    # (each field's metadata: the help of its `cacheaug train` option; flag=False: not an option of its own)
    n_latents: int = _f(16, "N_L latent embeddings per insertion")
    n_ahead: int = _f(16, "N_A target tokens per insertion")
    n_traces: int = _f(16, "K insertion points per sequence")
    init: str = _f(
        "copy",
        "the arm (cacheaug.arms): copy, lora, scratch; controls: 'pause' (pause tokens), "
        "'lora-decoder' (LoRA-tuned decoder)",
        choices=arm_names,
    )
    lora_rank: int = _f(64, "LoRA rank for init=lora")
    lora_alpha: float | None = _f(None, "", flag=False)
    init_seed: int = _f(0, "", flag=False)  # `cacheaug train` sets it from --seed
    # levers the paper leaves open (docs/results.md measures each)
    position_scheme: Literal["shifted", "shared", "overlap"] = _f(
        "shifted",
        "rotary positions of an insertion after token p: 'shifted' (latents p+1..p+N_L, text continues "
        "after them), 'shared' (every latent at p, the text keeps its positions), 'overlap' (latents p+1..p+N_L, "
        "the text keeps its positions)",
    )
    reread_last: bool = _f(False, "feed token p again after the latents, so that a real token predicts offset 1")
    echo_residual: bool = _f(
        False, "latents = token p's embedding + scale * read-out, scale starting at 0 (neutral start)"
    )
    readout: Literal["final_norm", "pre_norm"] = _f(
        "final_norm",
        "latents from the backbone's last hidden state after ('final_norm') or before ('pre_norm') its final norm",
    )
    offset_decay: float = _f(1.0, "loss weight of offset o proportional to decay**(o-1) (1 = the paper's uniform mean)")

    @property
    def n_inserted(self) -> int:
        """Cache entries one augmentation adds: the N_L latents, plus token p again with ``reread_last``."""
        return self.n_latents + int(self.reread_last)

    @property
    def position_shift(self) -> int:
        """How many of those entries take no text position: after an augmentation, the next token decoded sits at
        rotary position (cache length - position_shift); 0 when shifted (plain decoding), N_L (+1) otherwise."""
        return 0 if self.position_scheme == "shifted" else self.n_inserted

    def __post_init__(self) -> None:
        problems = []
        for name, lo, hi in (("n_latents", 1, 4096), ("n_ahead", 1, 4096), ("n_traces", 1, 65536)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                problems.append(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}")
        try:
            arm = get_arm(self.init)
        except ValueError as err:
            problems.append(str(err))
            arm = None
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            problems.append(f"`lora_rank` must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"`lora_alpha` must be positive or None, got {self.lora_alpha!r}")
        if self.position_scheme not in POSITION_SCHEMES:
            problems.append(f"`position_scheme` must be one of {POSITION_SCHEMES}, got {self.position_scheme!r}")
        if self.readout not in READOUTS:
            problems.append(f"`readout` must be one of {READOUTS}, got {self.readout!r}")
        for name in ("reread_last", "echo_residual"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.offset_decay, bool)
            or not isinstance(self.offset_decay, (int, float))
            or not 0 < self.offset_decay <= 1
        ):
            problems.append(f"`offset_decay` must be a number in (0, 1], got {self.offset_decay!r}")
        if self.readout == "pre_norm" and arm is not None and arm.backbone is None and arm.has_latents:
            problems.append(
                f"`readout='pre_norm'` needs a backbone; init={self.init!r} has none (use readout='final_norm')"
            )
        levers = {
            "position_scheme": "shifted",
            "reread_last": False,
            "echo_residual": False,
            "readout": "final_norm",
            "offset_decay": 1.0,
        }
        changed = [k for k, v in levers.items() if getattr(self, k) != v]
        if arm is not None and not arm.has_latents and changed:
            problems.append(f"init={self.init!r} inserts no latents: {changed} do not apply to it")
        if problems:
            raise ValueError("Invalid CoprocessorConfig:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoprocessorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import warnings

            warnings.warn(
                f"Ignoring unknown coprocessor config keys {unknown}: the checkpoint was written by a newer "
                "cacheaug; upgrade cacheaug to use them.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
