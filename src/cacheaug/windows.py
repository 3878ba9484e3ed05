"""Trace windows (speed option ``trace_windows``): one trace per row, and each layer reads only the text keys that the
trace can see.

In the packed and chunked layouts (model.py) every trace query meets all S text keys and every block of its row,
though a trace sees the text only up to its insertion point p, and a sliding-window layer only the last W-1 of
those keys. With trace windows each trace is a row of its own, and each layer gathers that row's text keys from
the prefix cache:

* sliding-window layers (window W): the W-1 keys p-W+2 .. p (those before position 0 masked), then the trace's
  own block: W-1+L keys instead of S+C*L (a sixth of Gemma 3's 1,024 + 8 x 31 at K=128 with chunks of 8 is saved
  per full layer, 57% per sliding layer);
* full-attention layers: the S text keys, then the block.

Attention then runs once per row with the query heads that share a key head folded into the query axis
(``[rows, H_kv, G*L, D_h]`` for G query heads per key head): one kernel tile then holds G*L queries of a trace
instead of L, and the key heads are not repeated G times (what transformers' sdpa does under a mask on CUDA).
Every entry's mask comes from :func:`cacheaug.masks.allowed`, the one rule, so the results are the packed pass's
(tests/test_trace_windows.py holds them to inference, trace by trace).

The attention goes through transformers' attention interface: :func:`install` wraps its ``sdpa`` entry so that a
call whose "mask" is a :class:`TraceKeys` runs :func:`trace_attention`, and hands every other call, unchanged, to
the function that was registered before. Only sdpa backbones that take one mask per layer type (Gemma-3, Qwen-2/3)
can use it (:func:`check_family`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .families import SLIDING, Family
from .masks import allowed

KEY_PAD = 16  # each row's keys are a multiple of this (masked extra keys): aligned masks for sdpa's kernels


@dataclass(frozen=True)
class TraceKeys:
    """What one layer type's attention reads in a pass of trace rows: the prefix cache, which text keys each row
    gathers from it, and the folded mask. Passed where a mask goes (``attention_mask={layer_type: TraceKeys}``)."""

    prefix: list  # per layer (keys, values) [B, H_kv, S, D_h] of the text
    index: torch.Tensor  # [N, S_w] flat index (b * S + j) of each row's text keys
    mask: torch.Tensor  # [N, 1, G*L, S_w + L] additive (0 = attend), query heads folded (head-major)
    groups: int  # G: query heads per key head


def check_family(family: Family) -> None:
    """Refuse a family that cannot run trace windows, saying what to use instead."""
    if family.attn_implementation != "sdpa" or not family.dict_masks:
        raise ValueError(
            f"trace_windows needs sdpa attention and a backbone that takes one mask per layer type (Gemma-3, "
            f"Qwen-2/3); this model ({family.model_type}) uses {family.attn_implementation}"
            f"{'' if family.dict_masks else ' with one mask for every layer'}. Use trace_chunk instead.")


def trace_keys(prefix_kv: list, positions: torch.Tensor, block_len: int, family: Family, groups: int) -> dict:
    """``{layer_type: TraceKeys}`` for B*K rows, one trace each (row b*K + k: insertion point ``positions[b, k]``),
    with blocks of ``block_len`` reading the S text keys of ``prefix_kv``. Each row's key count is rounded up to a
    multiple of KEY_PAD with keys the rule masks (sdpa's kernels want aligned masks)."""
    B, K = positions.shape
    S, device = prefix_kv[0][0].shape[2], positions.device
    dtype = prefix_kv[0][0].dtype
    p = positions.reshape(B * K, 1)  # [N, 1]
    q_pos = p + 1 + torch.arange(block_len, device=device)  # [N, L]: the block's positions in its virtual sequence
    seq = torch.arange(B, device=device).repeat_interleave(K)[:, None]  # [N, 1]
    out = {}
    for layer_type in family.mask_types:
        window = family.sliding_window if layer_type == SLIDING else None
        n = -(-(min(S, window - 1 if window else S) + block_len) // KEY_PAD) * KEY_PAD - block_len  # text keys read
        if window is None or n >= S:  # every text key, then padding (-1: no key)
            j = torch.cat([torch.arange(S, device=device), torch.full((n - S,), -1, device=device)]).expand(B * K, -1)
        else:  # the W-1 keys p-W+2 .. p that the block's queries can see, and masked ones before them
            j = p - (n - 1) + torch.arange(n, device=device)
        kv_pos = torch.cat([j, q_pos], dim=1)  # [N, n + L]
        kv_trace = torch.cat([torch.full_like(j, -1), torch.zeros_like(q_pos)], dim=1)  # text -1, own block 0
        ok = allowed(q_pos[:, :, None], 0, p[:, :, None], kv_pos[:, None, :], kv_trace[:, None, :], window)
        ok = ok & (kv_pos >= 0)[:, None, :]  # [N, L, n + L]: keys before the text's start do not exist
        bias = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, torch.finfo(dtype).min)
        mask = bias[:, None, None].expand(-1, 1, groups, -1, -1).reshape(B * K, 1, groups * block_len, -1)
        out[layer_type] = TraceKeys(prefix_kv, seq * S + j.clamp_min(0), mask, groups)
    return out


def _gather(text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``text`` ``[B, H_kv, S, D_h]`` at flat ``index`` ``[N, S_w]``: ``[N, H_kv, S_w, D_h]``."""
    B, H, S, D = text.shape
    return text.transpose(1, 2).reshape(B * S, H, D)[index].transpose(1, 2)


def trace_attention(module, query, key, value, keys: TraceKeys, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention of trace rows: ``query`` ``[N, H, L, D_h]``, ``key``/``value`` the rows' own blocks
    ``[N, H_kv, L, D_h]``; returns ``([N, L, H, D_h], None)`` as transformers' attention functions do."""
    if kwargs.get("softcap") is not None:
        raise ValueError("trace_windows runs sdpa, which has no attention soft-capping: use trace_chunk")
    text_k, text_v = keys.prefix[module.layer_idx]
    N, H, L, D = query.shape
    H_kv = key.shape[1]
    if H != H_kv * keys.groups:
        raise ValueError(f"layer {module.layer_idx} has {H} query heads for {H_kv} key heads, the mask {keys.groups}")
    k = torch.cat([_gather(text_k, keys.index), key], dim=2)  # [N, H_kv, S_w + L, D_h]
    v = torch.cat([_gather(text_v, keys.index), value], dim=2)
    q = query.reshape(N, H_kv, keys.groups * L, D)  # head h = kv * G + g (transformers' repeat_kv order)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.mask, dropout_p=dropout, scale=scaling)
    return out.reshape(N, H, L, D).transpose(1, 2).contiguous(), None


def install() -> None:
    """Route transformers' ``sdpa`` attention calls that carry :class:`TraceKeys` to :func:`trace_attention`
    (idempotent; every other call goes to the previously registered function, unchanged)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    previous = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(previous, "_cacheaug_trace_windows", False):
        return

    def sdpa_or_trace_windows(module, query, key, value, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, TraceKeys):
            return trace_attention(module, query, key, value, attention_mask, *args, **kwargs)
        return previous(module, query, key, value, attention_mask, *args, **kwargs)

    sdpa_or_trace_windows._cacheaug_trace_windows = True
    AttentionInterface.register("sdpa", sdpa_or_trace_windows)
