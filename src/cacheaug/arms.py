"""Arms: what is trained beside the frozen decoder, one registry entry each.

``CoprocessorConfig.init`` names an arm. The built-in arms:

* ``copy`` (the paper's default), ``lora``, ``scratch``: a coprocessor whose backbone is a trainable copy of the
  decoder, rank-r adapters over its frozen weights, or a random init of its architecture;
* ``pause``: the pause-token control, N_L trainable context-free embeddings through the same insertion path;
* ``lora-decoder``: the LoRA-tuned-decoder control, no latents, adapters on the decoder itself
  (:class:`cacheaug.controls.LoraDecoderLM`).

Everything that differs between arms is read from the :class:`Arm` entry: which model class wraps it, how its
backbone is built (or none), whether it inserts latents (and so takes the levers, serving and latent-based
evaluation), whether FSDP can shard it. Config validation, the CLI's choices, checkpoint loading,
``cacheaug.build_model``, lm-eval, serving and the benchmarks all read this table; adding an arm is one
:func:`register_arm` call (``tests/test_arms.py`` registers one from the test file, trains and evaluates it).

The registry knows no implementation: this module imports nothing from the package, and each arm registers itself
from its own module (the coprocessor arms and pause tokens in coprocessor.py, the LoRA-decoder control in
controls.py), as PEFT's tuners register themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One arm.

    Attributes:
        name: the ``init`` value that selects it.
        summary: one line for ``--help`` and docs.
        backbone: ``backbone(decoder, config) -> nn.Module``: the coprocessor's backbone, built from the frozen
            decoder (without its embedding matrix), its trainable parameters marked; None: no backbone (the
            soft tokens themselves are inserted, as pause tokens).
        model_class: the :class:`~cacheaug.model.CacheAugmentedLM` subclass that wraps it; None: CacheAugmentedLM
            itself.
        has_latents: it inserts latents into the cache (False: the levers, ``augment`` and serving do not apply).
        shards: FSDP can shard its trainable weights (False: small adapters over the decoder's shared weights).
    """

    name: str
    summary: str
    backbone: Callable | None = None
    model_class: type | None = None
    has_latents: bool = True
    shards: bool = True


ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> Arm:
    """Add (or replace) an arm; config validation, the CLI and every caller read this table."""
    ARMS[arm.name] = arm
    return arm


def arm_names() -> tuple[str, ...]:
    return tuple(ARMS)


def get_arm(name: str) -> Arm:
    if name not in ARMS:
        raise ValueError(f"`init` must be one of {arm_names()}, got {name!r}")
    return ARMS[name]
