"""Tiny random-init models of every supported family (no downloads)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ["gemma3", "gemma2", "llama", "mistral", "qwen2", "qwen3"]
WINDOW = 8  # small, so that traces cross the sliding window in 40-token tests

_COMMON = dict(
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


def tiny_config(family: str):
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    if family == "gemma3":
        return Gemma3TextConfig(**_COMMON, sliding_window=WINDOW, layer_types=mixed, query_pre_attn_scalar=16)
    if family == "gemma2":
        return Gemma2Config(
            **_COMMON,
            sliding_window=WINDOW,
            layer_types=mixed,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,  # small caps: they bite at this init scale
            final_logit_softcapping=3.0,
        )
    if family == "llama":
        return LlamaConfig(**_COMMON)
    if family == "mistral":
        return MistralConfig(**_COMMON, sliding_window=WINDOW)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    raise KeyError(family)


def tiny_model(family: str = "gemma3", attn: str = "sdpa", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn, dtype=dtype)
    return model.eval()


@pytest.fixture
def gemma3():
    return tiny_model("gemma3")
