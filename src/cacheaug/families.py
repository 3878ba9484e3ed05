"""What cacheaug needs to know about each supported Hugging Face decoder family.

The wrapped model is used through public module calls only (``get_decoder()``, ``get_input_embeddings()``,
``get_output_embeddings()``, ``forward(inputs_embeds=..., position_ids=..., attention_mask=..., cache)``).
The facts below are the ones that differ between families in transformers 5.x:

* whether the backbone accepts a dict ``{layer_type: mask}`` (Gemma-2/3, Qwen-2/3) or only one mask for
  every layer (Llama, Mistral);
* which layers use a sliding window;
* attention logit soft-capping (Gemma-2), which sdpa silently drops;
* the name of the cache keyword: ``past_key_values`` up to 5.2x, ``cache`` later (deprecated alias kept).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn

FULL = "full_attention"
SLIDING = "sliding_attention"
MASK_BACKENDS = ("sdpa", "eager", "flex_attention")

# model_type -> does the backbone accept a {layer_type: mask} dict as attention_mask?
_DICT_MASKS = {
    "gemma3_text": True,
    "gemma2": True,
    "qwen2": True,
    "qwen3": True,
    "llama": False,
    "mistral": False,
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_DICT_MASKS))


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
    if model_type not in _DICT_MASKS:
        raise ValueError(
            f"cacheaug does not support the architecture {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. For a Gemma 3 multimodal checkpoint, "
            "load its text model (Gemma3ForCausalLM) instead."
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
    if not _DICT_MASKS[model_type] and len(set(layer_types)) > 1:
        raise ValueError(f"{type(model).__name__} mixes layer types {sorted(set(layer_types))}, which cacheaug "
                         "supports only for Gemma-2/3 and Qwen-2/3.")
    if SLIDING in layer_types and not window:
        raise ValueError(f"{type(model).__name__} has sliding-window layers but no `sliding_window` in its config.")

    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in MASK_BACKENDS:
        raise ValueError(
            f"attn_implementation={attn!r} cannot take the arbitrary attention masks that multi-trace training and "
            f"augmentation need. Load the model with attn_implementation set to one of {MASK_BACKENDS} "
            "(sdpa is the default; flex_attention for Gemma-2 on a GPU)."
        )
    if getattr(config, "attn_logit_softcapping", None) and attn == "sdpa":
        raise ValueError(
            f"{type(model).__name__} applies attention logit soft-capping ({config.attn_logit_softcapping}), which "
            "sdpa silently drops, so its outputs would not be the model's. Load it with "
            "attn_implementation='flex_attention' (GPU) or 'eager'."
        )
    return Family(
        model_type=model_type,
        layer_types=layer_types,
        sliding_window=window if SLIDING in layer_types else None,
        dict_masks=_DICT_MASKS[model_type],
        attn_implementation=attn,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        cache_kwarg=cache_kwarg(model),
        max_positions=getattr(config, "max_position_embeddings", None),
    )
