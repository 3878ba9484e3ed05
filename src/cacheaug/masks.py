"""Attention masks for many augmentation points ("traces") computed in one pass.

Every trace k has an insertion point p_k: the latents and tokens of trace k live in a *virtual* sequence
``text[0..p_k], block_k[0..L-1]`` where block element i sits at position p_k + 1 + i. That is exactly the
sequence that inference builds (``augment`` then plain decoding), so the positions and the masks below
are the ones the unmodified model sees at inference. In the parallel pass all traces share one key
sequence: the T text tokens (from the prefix cache) followed by the K blocks of length L::

    keys:     text 0..T-1 | block 0 (L) | block 1 (L) | ... | block K-1 (L)
    queries:                block 0 (L) | block 1 (L) | ... | block K-1 (L)

A query of trace k may attend to text key j iff j <= p_k, and to a key of its own block iff that key
is not later than itself; on sliding-window layers also iff (query position - key position) < window,
the rule of transformers' ``sliding_window_overlay``. One function, :func:`allowed`, states that rule;
the dense masks (sdpa, eager) and the FlexAttention ``BlockMask`` are both built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import SLIDING, Family

# Text-key lengths of grouped passes (trace groups, below) are rounded up to a multiple of this (kernel tiles);
# the extra keys are masked, so results do not depend on it.
KEY_ALIGN = 64


@dataclass(frozen=True)
class TraceLayout:
    """Virtual positions and trace ids of the queries and keys of one multi-trace pass.

    ``q_*`` are ``[B, K*L]`` (one entry per query), ``kv_*`` are ``[B, T + K*L]``; text keys have trace -1.
    """

    q_pos: torch.Tensor
    q_trace: torch.Tensor
    q_limit: torch.Tensor  # p_k of the query's trace: the last text position it may see
    kv_pos: torch.Tensor
    kv_trace: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:  # [B, K*L]
        return self.q_pos


def trace_layout(positions: torch.Tensor, text_len: int, block_len: int) -> TraceLayout:
    """Layout for insertion points ``positions`` ``[B, K]`` over ``text_len`` text keys, blocks of ``block_len``."""
    B, K = positions.shape
    device = positions.device
    local = torch.arange(block_len, device=device)
    q_pos = (positions[:, :, None] + 1 + local).reshape(B, K * block_len)  # [B, K*L]
    q_trace = torch.arange(K, device=device).repeat_interleave(block_len).expand(B, -1)  # [B, K*L]
    q_limit = positions.repeat_interleave(block_len, dim=1)  # [B, K*L]
    text_pos = torch.arange(text_len, device=device).expand(B, -1)  # [B, T]
    kv_pos = torch.cat([text_pos, q_pos], dim=1)  # [B, T+K*L]
    kv_trace = torch.cat([torch.full_like(text_pos, -1), q_trace], dim=1)  # [B, T+K*L]
    return TraceLayout(q_pos, q_trace, q_limit, kv_pos, kv_trace)


def allowed(q_pos, q_trace, q_limit, kv_pos, kv_trace, window: int | None):
    """True where a query may attend to a key (broadcasts; also used element-wise inside a flex mask_mod)."""
    text = (kv_trace < 0) & (kv_pos <= q_limit)
    own_block = (kv_trace == q_trace) & (kv_pos <= q_pos)
    ok = text | own_block
    if window is not None:
        ok = ok & (q_pos - kv_pos < window)
    return ok


def dense_mask(layout: TraceLayout, window: int | None) -> torch.Tensor:
    """Boolean mask ``[B, 1, Q, KV]``, True = attend (the form sdpa takes)."""
    L = layout
    return allowed(
        L.q_pos[:, None, :, None],
        L.q_trace[:, None, :, None],
        L.q_limit[:, None, :, None],
        L.kv_pos[:, None, None, :],
        L.kv_trace[:, None, None, :],
        window,
    )


def block_mask(layout: TraceLayout, window: int | None, compiled: bool = False):
    """FlexAttention ``BlockMask`` with the same rule as :func:`dense_mask` (``compiled``: build it with a compiled
    ``create_block_mask`` on CUDA; cacheaug.speed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    L = layout
    B, Q = L.q_pos.shape
    KV = L.kv_pos.shape[1]

    def mask_mod(b, h, q, kv):
        return allowed(L.q_pos[b, q], L.q_trace[b, q], L.q_limit[b, q], L.kv_pos[b, kv], L.kv_trace[b, kv], window)

    return create_block_mask(
        mask_mod, B, None, Q, KV, device=L.q_pos.device, _compile=compiled and L.q_pos.device.type == "cuda"
    )


def attention_masks(layout: TraceLayout, family: Family, dtype: torch.dtype, compile_block_masks: bool = False):
    """Masks for every layer type of ``family``, in the form its attention backend takes.

    Returns a ``{layer_type: mask}`` dict for backbones that accept one, else the single mask that all
    layers share. sdpa gets bool masks, eager additive float masks (a bool mask there is silently wrong:
    see docs/correctness.md), flex_attention a ``BlockMask``.
    """
    masks = {}
    for layer_type in family.mask_types:
        window = family.sliding_window if layer_type == SLIDING else None
        if family.attn_implementation == "flex_attention":
            masks[layer_type] = block_mask(layout, window, compile_block_masks)
            continue
        mask = dense_mask(layout, window)
        if family.attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        masks[layer_type] = mask
    if family.dict_masks:
        return masks
    (only,) = masks.values()  # resolve_family guarantees one layer type for single-mask backbones
    return only


# ---------------------------------------------------------------------------------------------- trace groups
# A trace whose insertion point is p reads text keys 0..p only. With G trace groups the valid insertion points
# [0, T-1-N_A] are cut into G equal segments and K/G points are drawn in each (stratified sampling). The traces
# of segment g then never read text beyond the segment's end, so their two passes (coprocessor and decoder) run
# against the first S_g text keys only, not all T (counted: two thirds of the trace attention work at G=2, half
# at G=4), with the same result (the dropped keys are masked for them anyway).


def group_edges(n_valid: int, groups: int) -> list[int]:
    """Segment boundaries ``e_0=0 < ... < e_G=n_valid`` of the insertion points ``[0, n_valid)``."""
    return [g * n_valid // groups for g in range(groups + 1)]


def group_key_lengths(text_len: int, n_ahead: int, groups: int) -> list[int]:
    """Text keys read by each trace group: S_g >= e_{g+1} (points of group g are < e_{g+1}), KEY_ALIGN-rounded."""
    edges = group_edges(text_len - n_ahead, groups)
    return [min(text_len, -(-e // KEY_ALIGN) * KEY_ALIGN) for e in edges[1:]]


def check_trace_groups(groups: int, n_traces: int) -> None:
    """Refuse a group count that cannot stratify ``n_traces`` points (with at least K valid points, each of the
    G segments holds at least K/G)."""
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"trace_groups must be a positive integer, got {groups!r}.")
    if n_traces % groups:
        raise ValueError(
            f"trace_groups={groups} must divide the number of traces K={n_traces} (each group draws K/G "
            "insertion points in its own segment): pick a divisor of K, or 1 to turn grouping off."
        )


def stratified_positions(
    batch: int, n_valid: int, n_traces: int, groups: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[B, K]`` sorted distinct insertion points, K/G drawn uniformly (without replacement) in each of the G
    equal segments of ``[0, n_valid)``; G=1 is plain uniform sampling. Drawn on the CPU."""
    check_trace_groups(groups, n_traces)
    edges, per = group_edges(n_valid, groups), n_traces // groups
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        scores = torch.rand(batch, hi - lo, generator=generator)
        parts.append(scores.argsort(dim=1)[:, :per].sort(dim=1).values + lo)
    return torch.cat(parts, dim=1)


def groups_fitting(positions: torch.Tensor, text_len: int, n_ahead: int, groups: int) -> int:
    """``groups`` if every trace slot lies inside its group's keys (slots g*K/G.. belong to group g), else 1:
    positions that were not drawn by :func:`stratified_positions` run the ungrouped pass. Syncs if on a GPU."""
    K = positions.shape[-1]
    if groups == 1 or K % groups:
        return 1
    limits = torch.tensor(group_key_lengths(text_len, n_ahead, groups), device=positions.device)
    return groups if bool((positions < limits.repeat_interleave(K // groups)).all()) else 1
