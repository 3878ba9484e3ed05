"""What cacheaug needs to know about each supported Hugging Face decoder family.

The wrapped model is used through public module calls only (``get_decoder()``, ``get_input_embeddings()``,
``get_output_embeddings()``, ``forward(inputs_embeds=..., position_ids=..., attention_mask=..., cache)``).
The facts below are the ones that differ between families in transformers 5.x:

* whether the backbone accepts a dict ``{layer_type: mask}`` (Gemma-2/3, Qwen-2/3) or only one mask for
  every layer (Llama, Mistral);
* which layers use a sliding window;
* attention logit soft-capping (Gemma-2), which sdpa silently drops;
* the name of the cache keyword: ``past_key_values`` up to 5.2x, ``cache`` later (deprecated alias kept).

Each supported family is one :class:`FamilySpec` in :data:`FAMILIES` (its facts, whether sdpa computes it
exactly, and the 3-layer random config the tests run it at). Adding a family is one :func:`register_family`
call; ``tests/test_families.py`` registers one from the test file and runs the exactness check, training and
evaluation on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

FULL = "full_attention"
SLIDING = "sliding_attention"
MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
TINY_WINDOW = 8  # the tiny test configs' sliding window: small, so that traces cross it in 40-token tests
TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.2,  # large enough that masks and positions visibly change the outputs
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)
_MIXED = ["sliding_attention", "full_attention", "sliding_attention"]


@dataclass(frozen=True)
class FamilySpec:
    """One supported decoder family.

    Attributes:
        name: the short name tests and scripts use ("gemma3").
        model_type: the Hugging Face ``config.model_type`` it matches ("gemma3_text").
        dict_masks: the backbone accepts a ``{layer_type: mask}`` dict as ``attention_mask`` (needed for models that
            mix full and sliding-window layers).
        tiny_config: a 3-layer random-init config with full and sliding layers where the family has them.
        sdpa_exact: False when sdpa silently changes the model (Gemma-2's attention soft-capping): then eager is the
            default attention, flex_attention for training on a GPU, and sdpa is refused.
    """

    name: str
    model_type: str
    dict_masks: bool
    tiny_config: Callable[[], object]
    sdpa_exact: bool = True

    def default_attn_implementation(self, on_gpu: bool, for_training: bool) -> str:
        if self.sdpa_exact:
            return "sdpa"
        return "flex_attention" if on_gpu and for_training else "eager"


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add (or replace) a supported family; every check, default and test that lists families reads this table."""
    FAMILIES[spec.name] = spec
    return spec


def family_spec(model_type: str | None) -> FamilySpec | None:
    return next((s for s in FAMILIES.values() if s.model_type == model_type), None)


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(s.model_type for s in FAMILIES.values()))


def _tiny(cls_name: str, **extra):
    def make():
        import transformers

        return getattr(transformers, cls_name)(**TINY_COMMON, **extra)

    return make


register_family(
    FamilySpec(
        "gemma3",
        "gemma3_text",
        True,
        _tiny("Gemma3TextConfig", sliding_window=TINY_WINDOW, layer_types=_MIXED, query_pre_attn_scalar=16),
    )
)
register_family(
    FamilySpec(
        "gemma2",
        "gemma2",
        True,
        _tiny(
            "Gemma2Config",
            sliding_window=TINY_WINDOW,
            layer_types=_MIXED,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
        sdpa_exact=False,
    )
)  # small caps: they bite here
register_family(FamilySpec("llama", "llama", False, _tiny("LlamaConfig")))
register_family(FamilySpec("mistral", "mistral", False, _tiny("MistralConfig", sliding_window=TINY_WINDOW)))
register_family(
    FamilySpec(
        "qwen2",
        "qwen2",
        True,
        _tiny("Qwen2Config", use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1),
    )
)
register_family(
    FamilySpec(
        "qwen3",
        "qwen3",
        True,
        _tiny("Qwen3Config", use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1),
    )
)
SUPPORTED_MODEL_TYPES = supported_model_types()  # the built-in families


@dataclass(frozen=True)
class Family:
    """Per-architecture facts resolved once for a wrapped model."""

    model_type: str
    layer_types: tuple[str, ...]  # one entry per decoder layer: FULL or SLIDING
    sliding_window: int | None
    dict_masks: bool
    attn_implementation: str
    final_logit_softcap: float | None
    cache_kwarg: str  # "cache" or "past_key_values"
    max_positions: int | None

    @property
    def mask_types(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.layer_types)))


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model``'s backbone takes a Cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier 5.x)."""
    params = inspect.signature(model.get_decoder().forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def resolve_family(model: nn.Module) -> Family:
    """Inspect a causal LM and return its :class:`Family`, refusing what cacheaug cannot run exactly."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    spec = family_spec(model_type)
    if spec is None:
        raise ValueError(
            f"cacheaug does not support the architecture {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(supported_model_types())} (cacheaug.families.register_family adds "
            "one). For a Gemma 3 multimodal checkpoint, load its text model (Gemma3ForCausalLM) instead."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{type(model).__name__} uses bidirectional attention; cacheaug needs a causal decoder.")

    n_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Llama, Mistral: one attention type for every layer
        layer_types = [SLIDING if window else FULL] * n_layers
    layer_types = tuple(layer_types[:n_layers])
    unknown = set(layer_types) - {FULL, SLIDING}
    if unknown:
        raise ValueError(f"{type(model).__name__} has layer types {sorted(unknown)} that cacheaug cannot mask.")
    if not spec.dict_masks and len(set(layer_types)) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes layer types {sorted(set(layer_types))}, which cacheaug "
            "supports only for families whose backbone takes one mask per layer type (Gemma-2/3, "
            "Qwen-2/3)."
        )
    if SLIDING in layer_types and not window:
        raise ValueError(f"{type(model).__name__} has sliding-window layers but no `sliding_window` in its config.")

    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in MASK_BACKENDS:
        raise ValueError(
            f"attn_implementation={attn!r} cannot take the arbitrary attention masks that multi-trace training and "
            f"augmentation need. Load the model with attn_implementation set to one of {MASK_BACKENDS} "
            "(sdpa is the default; flex_attention for Gemma-2 on a GPU)."
        )
    if (getattr(config, "attn_logit_softcapping", None) or not spec.sdpa_exact) and attn == "sdpa":
        raise ValueError(
            f"{type(model).__name__} applies attention logit soft-capping ({config.attn_logit_softcapping}), which "
            "sdpa silently drops, so its outputs would not be the model's. Load it with "
            "attn_implementation='flex_attention' (GPU) or 'eager'."
        )
    return Family(
        model_type=model_type,
        layer_types=layer_types,
        sliding_window=window if SLIDING in layer_types else None,
        dict_masks=spec.dict_masks,
        attn_implementation=attn,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        cache_kwarg=cache_kwarg(model),
        max_positions=getattr(config, "max_position_embeddings", None),
    )
