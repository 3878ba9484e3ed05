"""Key/value caches: the few operations the library performs on transformers' ``DynamicCache``.

Caches here are built without a model config, so every layer (sliding-window ones too) keeps every position and the
sliding window is applied by the masks; that is what lets one prefix serve many insertion points. A cache is a list
of per-layer ``(keys, values)`` pairs, each ``[B, H_kv, S, D_h]``. Appending to a :func:`fork` concatenates into new
tensors, so the cache it was forked from never changes: augmenting, replaying and batching all rely on that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]


def from_layers(kv: KV) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv`` (one ``(keys, values)`` pair per layer), without copying."""
    return DynamicCache(ddp_cache_data=kv)


def layers(cache: DynamicCache) -> KV:
    """The per-layer ``(keys, values)`` of ``cache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def length(cache: DynamicCache) -> int:
    """Positions (entries) in ``cache``."""
    return cache.layers[0].keys.shape[2] if cache.layers and cache.layers[0].keys is not None else 0


def fork(cache: DynamicCache, upto: int | None = None) -> DynamicCache:
    """A new cache over the first ``upto`` positions of ``cache`` (all by default): views, no copy; decoding into the
    fork leaves ``cache`` as it was."""
    return from_layers([(k[:, :, :upto], v[:, :, :upto]) for k, v in layers(cache)])


def expand(cache: DynamicCache, n: int) -> DynamicCache:
    """A batch-1 cache seen as a batch of ``n`` identical rows (views: e.g. several continuations of one context)."""
    return from_layers([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in layers(cache)])


def left_pad(kvs: list[KV], lengths: list[int], extra: int) -> tuple[KV, torch.Tensor]:
    """Several caches (as ``kvs``, ``lengths`` positions each) left-padded to the longest and stacked on the batch
    axis, and the 2D attention mask ``[B, longest + extra]`` (1 = real position; ``extra`` new positions per row).
    Left padding keeps every row's query-to-key distances, so sliding windows mask as they do unbatched."""
    longest = max(lengths)
    padded = []
    for layer in range(len(kvs[0])):
        keys = [F.pad(kv[layer][0], (0, 0, longest - n, 0)) for kv, n in zip(kvs, lengths)]
        values = [F.pad(kv[layer][1], (0, 0, longest - n, 0)) for kv, n in zip(kvs, lengths)]
        padded.append((torch.cat(keys), torch.cat(values)))
    mask = torch.zeros(len(kvs), longest + extra, dtype=torch.long, device=kvs[0][0][0].device)
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1
    return padded, mask


def unpad_rows(cache: DynamicCache, lengths: list[int]) -> list[DynamicCache]:
    """The rows of a left-padded batch cache as one cache each, row i keeping its last ``lengths[i]`` positions."""
    total = length(cache)
    return [
        from_layers([(k[i : i + 1, :, total - n :], v[i : i + 1, :, total - n :]) for k, v in layers(cache)])
        for i, n in enumerate(lengths)
    ]
