"""Trace windows (speed option ``trace_windows``): on sliding-window layers each trace is a row of its own and reads
only the text keys it can see.

In the packed and chunked layouts (model.py) every trace query meets all S text keys and every block of its row,
though a trace sees the text only up to its insertion point p, and a sliding-window layer only the last W-1 of
those keys. With trace windows each layer gathers its rows' text keys from the prefix cache:

* sliding-window layers (window W): one trace per row, the W-1 keys p-W+2 .. p (those before position 0 masked),
  then the trace's own block: W-1+L keys (Gemma 3 at T=1,024: 542 instead of 1,024 + 8 x 31 with chunks of 8);
* full-attention layers: the S text keys, then the blocks of the row's C traces (``trace_chunk`` C; 1 without).

Attention then runs once per row with the query heads that share a key head folded into the query axis
(``[rows, H_kv, G*C*L, D_h]`` for G query heads per key head): one kernel tile then holds G*L queries of a trace
instead of L, and the key heads are not repeated G times (what transformers' sdpa does under a mask on CUDA).
Every entry's mask comes from :func:`cacheaug.masks.allowed`, the one rule, so the results are the packed pass's
(tests/test_trace_windows.py holds them to inference, trace by trace).

With ``kernel`` (the speed option ``trace_kernel``) the rows run :func:`cacheaug.prefix_attention.prefix_attention`
instead: the text keys are read in place from the prefix cache (no gathered copies), text tiles no query of a row may
see are skipped, and backward computes no gradient for the text keys. When the prefix cache requires grad (an arm
whose decoder trains) or attention dropout is on, those rows take the sdpa path above: the same results.

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
from .prefix_attention import gather_rows, prefix_attention

KEY_PAD = 16  # each row's keys are a multiple of this (masked extra keys): aligned masks for sdpa's kernels


@dataclass(frozen=True)
class TraceKeys:
    """What one layer type's attention reads in a pass of trace rows: the prefix cache, which text keys each row of
    ``chunk`` traces gathers from it, and the folded mask. Passed where a mask goes (``attention_mask={layer_type:
    TraceKeys}``)."""

    prefix: list  # per layer (keys, values) [B, H_kv, S, D_h] of the text
    index: torch.Tensor  # [R, S_w] flat index (b * S + j) of each row's text keys (R = N / chunk rows)
    mask: torch.Tensor | None  # [R, 1, G*C*L, S_w + C*L] additive (0 = attend), query heads folded (head-major);
    # None with ``kernel`` (then folded from ``bias`` only where a row takes the sdpa path)
    groups: int  # G: query heads per key head
    chunk: int  # C: traces per row
    kernel: bool = False  # run prefix_attention (reading the text in place) where it can
    bias: torch.Tensor | None = None  # [R, C*L, S_w + C*L] additive, unfolded (the kernel's mask)
    seq: torch.Tensor | None = None  # [R] the sequence each row reads
    start: torch.Tensor | None = None  # [R] text position of each row's first text column
    lo: torch.Tensor | None = None  # [R] int32: text columns outside [lo, hi) are masked for the whole row
    hi: torch.Tensor | None = None
    full: torch.Tensor | None = None  # [R, 2] int32: every query of the row sees the text columns [full_lo, full_hi)


def check_family(family: Family) -> None:
    """Refuse a family that cannot run trace windows, saying what to use instead."""
    if family.attn_implementation != "sdpa" or not family.dict_masks:
        raise ValueError(
            f"trace_windows needs sdpa attention and a backbone that takes one mask per layer type (Gemma-3, "
            f"Qwen-2/3); this model ({family.model_type}) uses {family.attn_implementation}"
            f"{'' if family.dict_masks else ' with one mask for every layer'}. Use trace_chunk instead."
        )


def trace_keys(
    prefix_kv: list,
    positions: torch.Tensor,
    block_len: int,
    family: Family,
    groups: int,
    full_chunk: int = 1,
    kernel: bool = False,
) -> dict:
    """``{layer_type: TraceKeys}`` for the B*K traces (trace b*K + k: insertion point ``positions[b, k]``), blocks of
    ``block_len`` reading the S text keys of ``prefix_kv``. Sliding-window layers run one trace per row; full layers
    ``full_chunk`` consecutive traces of a sequence per row (C divides K). Each row's key count is rounded up to a
    multiple of KEY_PAD with keys the rule masks (sdpa's kernels want aligned masks). ``kernel``: also what
    :func:`cacheaug.prefix_attention.prefix_attention` reads (a compiled step drops whichever path is not used)."""
    B, K = positions.shape
    S, device, dtype = prefix_kv[0][0].shape[2], positions.device, prefix_kv[0][0].dtype
    L = block_len
    out = {}
    for layer_type in family.mask_types:
        window = family.sliding_window if layer_type == SLIDING else None
        C = 1 if window is not None else full_chunk
        R = B * K // C
        p = positions.reshape(R, C)  # [R, C]
        q_pos = (p[:, :, None] + 1 + torch.arange(L, device=device)).reshape(R, C * L)  # virtual positions (masks.py)
        q_trace = torch.arange(C, device=device).repeat_interleave(L).expand(R, -1)  # [R, C*L]
        n = -(-(min(S, window - 1 if window else S) + C * L) // KEY_PAD) * KEY_PAD - C * L  # text keys read
        if window is None or n >= S:  # every text key, then padding (-1: no key)
            j = torch.cat([torch.arange(S, device=device), torch.full((n - S,), -1, device=device)]).expand(R, -1)
        else:  # the W-1 keys p-W+2 .. p that the block's queries can see, and masked ones before them
            j = p - (n - 1) + torch.arange(n, device=device)
        kv_pos = torch.cat([j, q_pos], dim=1)  # [R, n + C*L]
        kv_trace = torch.cat([torch.full_like(j, -1), q_trace], dim=1)  # text -1, block c: c
        ok = allowed(
            q_pos[:, :, None],
            q_trace[:, :, None],
            p.repeat_interleave(L, dim=1)[:, :, None],
            kv_pos[:, None, :],
            kv_trace[:, None, :],
            window,
        )
        ok = ok & (kv_pos >= 0)[:, None, :]  # [R, C*L, n + C*L]: keys before the text's start do not exist
        bias = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, torch.finfo(dtype).min)
        seq = torch.arange(B, device=device).repeat_interleave(K // C)[:, None]  # [R, 1]
        extra = {}
        if kernel:
            seen = ok[:, :, :n].any(1)  # [R, n]: text columns some query of the row sees
            some = seen.any(1)
            extra = dict(
                kernel=True,
                bias=bias,
                seq=seq[:, 0],
                start=j[:, 0] if window is not None and n < S else torch.zeros(R, dtype=torch.long, device=device),
                lo=torch.where(some, seen.int().argmax(1), 0).int(),
                hi=torch.where(some, n - seen.flip(1).int().argmax(1), 0).int(),
                full=_seen_by_all(ok[:, :, :n]),
            )
        out[layer_type] = TraceKeys(
            prefix_kv, seq * S + j.clamp_min(0), None if kernel else _fold(bias, groups), groups, C, **extra
        )
    return out


def _seen_by_all(ok: torch.Tensor) -> torch.Tensor:
    """``[R, 2]`` int32: the first run of text columns that every query of a row sees (``ok`` ``[R, queries, n]``),
    empty (0, 0) where there is none. One trace per row on a sliding layer: the W-L keys before its point that its
    last query still sees; a full layer: the text up to the row's first point."""
    every = ok.all(1)  # [R, n]
    any_ = every.any(1)
    first = torch.where(any_, every.int().argmax(1), 0)
    after = ~every & (torch.arange(ok.shape[-1], device=ok.device) >= first[:, None])
    end = torch.where(after.any(1), after.int().argmax(1), ok.shape[-1])
    return torch.stack([first, torch.where(any_, end, 0)], dim=1).int()


def _fold(bias: torch.Tensor, groups: int) -> torch.Tensor:
    """The mask ``[R, C*L, keys]`` for the G query heads folded head-major: ``[R, 1, G*C*L, keys]``."""
    R, CL, n = bias.shape
    return bias[:, None, None].expand(-1, 1, groups, -1, -1).reshape(R, 1, groups * CL, n)


def trace_attention(module, query, key, value, keys: TraceKeys, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention of trace rows: ``query`` ``[N, H, L, D_h]``, ``key``/``value`` the traces' own blocks
    ``[N, H_kv, L, D_h]``; returns ``([N, L, H, D_h], None)`` as transformers' attention functions do."""
    text_k, text_v = keys.prefix[module.layer_idx]  # (soft-capping models never get here: sdpa is refused for them)
    N, H, L, D = query.shape
    H_kv, G, C = key.shape[1], keys.groups, keys.chunk
    R = N // C

    def rows(x):  # [N, H_kv, L, D] -> [R, H_kv, C*L, D]: the C blocks of a row one after the other
        return x.view(R, C, H_kv, L, D).transpose(1, 2).reshape(R, H_kv, C * L, D)

    # queries folded head-major: (g, c, l) for key head kv, with head h = kv * G + g (transformers' repeat_kv order)
    q = query.view(R, C, H_kv, G, L, D).permute(0, 2, 3, 1, 4, 5)  # [R, H_kv, G, C, L, D]
    text_grad = torch.is_grad_enabled() and (text_k.requires_grad or text_v.requires_grad)
    if keys.kernel and dropout == 0.0 and not text_grad:
        # [R, H_kv, G, C*L, D]: a view of the projections [N, L, H, D] (as transformers passes them); the output comes
        # laid out as the query, so the permutation back below is a view too (no copy either way)
        out, _ = prefix_attention(
            q.reshape(R, H_kv, G, C * L, D),
            rows(key),
            rows(value),
            text_k,
            text_v,
            keys.seq,
            keys.start,
            keys.bias,
            keys.lo,
            keys.hi,
            D**-0.5 if scaling is None else scaling,
            keys.full,
        )
    else:
        k = torch.cat([gather_rows(text_k, keys.index), rows(key)], dim=2)  # [R, H_kv, S_w + C*L, D_h]
        v = torch.cat([gather_rows(text_v, keys.index), rows(value)], dim=2)
        mask = keys.mask if keys.mask is not None else _fold(keys.bias, G)
        out = F.scaled_dot_product_attention(
            q.reshape(R, H_kv, G * C * L, D), k, v, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    out = out.view(R, H_kv, G, C, L, D).permute(0, 3, 4, 1, 2, 5)  # [R, C, L, H_kv, G, D]
    return out.reshape(N, L, H, D), None


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
