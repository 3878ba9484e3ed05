"""Rotary tables (speed option ``rope_table``): each rotary-embedding module of the decoder and the coprocessor looks
its cos/sin up in a table of every position, computed once, instead of computing them per call.

Transformers computes cos(position x frequency) and sin on every forward. Inside a compiled training step inductor
fuses that computation into each consumer, so every layer's rotary (forward and backward, queries and keys)
evaluates float32 cos and sin per element: Triton's accurate functions (not the hardware's approximation), about 80
instructions an element each with their range reduction. At Gemma 3 270M's shapes that made the step's rotary
kernels compute-bound (docs/performance.md, "Session 23"). A table row is the module's own output for that position
(the module computes the table itself, on the same device, in float32), so a lookup returns exactly what the module
would, cast to the input's dtype as it casts.

Only rotary types whose frequencies do not depend on the input are tabled ("default", "linear", "llama3", "yarn");
a module of another type ("dynamic", "longrope", ...) is left as it is. Positions must be below the model's
``max_position_embeddings`` (what the library's input checks hold). A table holds cos and sin in float32 for every
position: 64 MiB per layer type at Gemma 3 270M's 32,768 positions and head size 256. Modules whose tables come out
equal (bit for bit: the coprocessor's copy of the decoder and the decoder) share one copy (128 MiB in all there,
256 MiB before sharing; 0.15 GiB more peak memory measured at K=128, batch 16 without it).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

STATIC_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_types(module: nn.Module) -> list[str]:
    kind = getattr(module, "rope_type", "default")
    return list(kind.values()) if isinstance(kind, dict) else [kind]


def _keys(module: nn.Module, forward) -> list[tuple]:
    """The extra arguments the module is called with: one per layer type where its forward takes ``layer_type``."""
    if "layer_type" in inspect.signature(forward).parameters and getattr(module, "layer_types", None):
        return [(t,) for t in module.layer_types]
    return [()]


def _limit(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    limit = getattr(module, "original_max_seq_len", None) or getattr(config, "max_position_embeddings", None)
    if not limit:
        raise ValueError(f"{type(module).__name__} names no max_position_embeddings: no rotary table can be sized")
    return int(limit)


def table_rotary(module: nn.Module, shared: dict | None = None) -> bool:
    """Make ``module`` (a transformers rotary embedding) look its cos/sin up in tables; False where its rotary type
    depends on the input (left unchanged). Idempotent. ``shared``: tables built so far by other modules (filled in),
    reused where this module's come out bit for bit equal."""
    if getattr(module, "_cacheaug_rope_tables", None) is not None:
        return True
    if not all(t in STATIC_TYPES for t in _rope_types(module)):
        return False
    original, limit, tables = module.forward, _limit(module), {}

    def build(device: torch.device, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = torch.empty(0, dtype=torch.float32, device=device)
            cos, sin = original(x, torch.arange(limit, device=device)[None], *key)
        tables[key] = (cos[0].float(), sin[0].float())  # [limit, D]
        return tables[key]

    def forward(x, position_ids, *args, **kwargs):
        key = tuple(args) + tuple(v for _, v in sorted(kwargs.items()))
        table = tables.get(key)
        if table is None or table[0].device != x.device:
            if torch.compiler.is_compiling():  # not built before the compile: the module's own computation
                return original(x, position_ids, *args, **kwargs)
            table = build(x.device, key)
        cos, sin = table
        return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

    device = next((b.device for b in module.buffers()), torch.device("cpu"))
    for key in _keys(module, original):
        cos, sin = build(device, key)
        if shared is not None:
            same = shared.setdefault((key, tuple(cos.shape), str(cos.device)), [])
            kept = next(((c, s) for c, s in same if torch.equal(c, cos) and torch.equal(s, sin)), None)
            if kept is None:
                same.append((cos, sin))
            else:  # another module's equal table: one copy for both
                tables[key] = kept
    module.forward = forward
    module._cacheaug_rope_tables = tables
    return True


def table_rotaries(decoders: list[nn.Module]) -> int:
    """:func:`table_rotary` on every rotary-embedding module of ``decoders``; returns how many were tabled."""
    n, shared = 0, {}
    for decoder in decoders:
        for module in decoder.modules():
            if type(module).__name__.endswith("RotaryEmbedding") and table_rotary(module, shared):
                n += 1
    return n
