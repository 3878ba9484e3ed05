"""Configuration of a cache coprocessor (the trainable half of a cache-augmented model).

Symbols follow the paper (arXiv 2412.17747, section 2):
  N_L = ``n_latents``  latent embeddings the coprocessor writes into the cache per insertion
  N_A = ``n_ahead``    real tokens after the insertion point whose loss trains it
  K   = ``n_traces``   insertion points ("traces") trained in one parallel pass per sequence
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

INITS = ("copy", "lora", "scratch", "pause", "lora-decoder")


@dataclass(frozen=True)
class CoprocessorConfig:
    """Shape and initialisation of the coprocessor.

    Args:
        n_latents: N_L, latent embeddings appended to the cache per augmentation (paper: 8-64).
        n_ahead: N_A, teacher-forced real tokens after the insertion point that carry the loss;
            offset 1 is predicted by the last latent, offset j > 1 by ahead token j - 1 (paper: 16).
        n_traces: K, insertion points sampled per training sequence when none are given (paper: 128).
        init: "copy" (the decoder's weights, fully trainable: the paper's default), "lora"
            (rank-r adapters over the decoder's frozen weights, shared in memory) or "scratch"
            (random init with the decoder's architecture). "pause" is the pause-token control: no
            backbone, the N_L trainable soft tokens themselves are inserted (context-free), same data path.
            "lora-decoder" is the LoRA-tuned-decoder control: no latents; rank-r adapters on (a copy of the
            module tree of) the decoder itself, trained on the same target tokens.
        lora_rank: rank r of the adapters when ``init="lora"`` (paper ablations: 64, 128).
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_rank); None means lora_rank.
        init_seed: seed for the soft-token choice and the scratch weights, so builds are repeatable.

    >>> CoprocessorConfig(n_latents=16, n_ahead=16, n_traces=16).init
    'copy'
    """

    n_latents: int = 16
    n_ahead: int = 16
    n_traces: int = 16
    init: Literal["copy", "lora", "scratch", "pause", "lora-decoder"] = "copy"
    lora_rank: int = 64
    lora_alpha: float | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name, lo, hi in (("n_latents", 1, 4096), ("n_ahead", 1, 4096), ("n_traces", 1, 65536)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                problems.append(f"`{name}` must be an integer in [{lo}, {hi}], got {value!r}")
        if self.init not in INITS:
            problems.append(f"`init` must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            problems.append(f"`lora_rank` must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"`lora_alpha` must be positive or None, got {self.lora_alpha!r}")
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
