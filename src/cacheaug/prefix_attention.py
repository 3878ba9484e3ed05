"""Shared-prefix attention of trace rows: the op behind the speed option ``trace_kernel`` (cacheaug.windows).

Each row of the windowed trace passes (windows.py) attends to a range of its sequence's text keys, then to its own
block of C traces. The sdpa path gathers that range into a copy per row and runs torch's kernel over [copy; block]
with a dense additive mask; its backward also computes gradients for the copied text keys, which are thrown away
(the prefix cache of a frozen decoder takes none). This op instead

* reads the text keys and values in place from the prefix cache (no per-row copy),
* skips the tiles of text columns that no query of the row may see (``lo``/``hi``), and does not read the mask on
  tiles whose columns every query sees (``full``),
* computes, in backward, dQ over text and block, and in a second kernel dK/dV of the row's block only (each
  program owns a tile of block keys and loops over the row's queries: no atomics).

    o, lse = prefix_attention(q, k_blk, v_blk, text_k, text_v, seq, start, bias, lo, hi, scale, full)

=========================  ==========================================================================================
``q [R, H, M, D]``          queries of row r under key head h; M = G x C x L, the G query heads that share key head h
                            folded head-major (windows.py), so query m takes mask row ``m % (C x L)``; or the same as
                            ``[R, H, G, C x L, D]`` with any strides (windows.py passes a view of the model's
                            ``[N, L, heads, D]`` projections: no copy in, none out)
``k_blk, v_blk [R,H,CL,D]`` the row's own block keys and values (CL = C x L)
``text_k, text_v``          the prefix cache ``[B, H, S, D]``; no gradient flows to it
``seq, start [R]`` (int)    row r's text column j is key ``start[r] + j`` of sequence ``seq[r]`` (out of 0..S-1: masked)
``bias [R, CL, n + CL]``    additive mask (0: attend; the dtype's min: masked), n text columns then CL block columns
``lo, hi [R]`` (int)        text columns outside ``[lo, hi)`` are masked for every query of the row
``full [R, 2]`` (int32)     optional: every query of row r sees text columns ``[full[r, 0], full[r, 1])`` (a range
                            inside ``[lo, hi)`` whose keys exist): their tiles do not read the mask
=========================  ==========================================================================================

Returns ``o`` (q's shape and dtype, laid out as ``torch.empty_like(q)``) and the log-sum-exp ``lse`` ``[R, H, M]``
(float32, no gradient). The result is softmax(q [text; block]^T x scale + bias) [text; block], as sdpa computes it
over the gathered keys.

On CUDA (with Triton) it runs the Triton kernels of prefix_attention_kernels.py: one program per (row, tile of
queries, key head); forward with the online softmax; backward dQ from the saved log-sum-exp (and rowsum(dO x O),
computed there), then the block's dK/dV (one program per row, tile of block keys and key head). This module holds
their tile settings, launches them (with fallbacks where the GPU refuses a setting) and wraps them in a custom op.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (how the tests check them). Elsewhere a torch
reference (gather, then dense attention in float32) computes the same values.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

try:
    import triton
except ImportError:  # the CPU install: the reference implementation runs instead
    triton = None
if triton is not None:
    from .prefix_attention_kernels import _block_grad_kernel, _prefix_attention_kernel
try:
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:

    class _OutOfResources(Exception):
        """Stands in where Triton is absent or names the error elsewhere."""


# Tile sizes and launch settings of the forward and the backward kernel, as measured on an H200 at head size 256
# in bf16 (docs/performance.md, "Session 20" and "Session 21"; benchmarks/trace_attention.py sweeps them with
# --kernel-tiles and --kernel-backward-tiles; the environment variable CACHEAUG_TRACE_KERNEL_TILES sets them). The
# forward takes WIDE_CONFIG for rows of more than CONFIG's BLOCK_M queries (M = G x C x L: the decoder's trace rows,
# 4 x 31 with Gemma 3): one tile of 128 queries reads each key tile once where two of 64 read it twice (a sliding
# layer 0.64 ms against 0.87); at M = 64 (the coprocessor's rows) a 128-query tile is half empty (0.64 against 0.46).
# The backward at 64 x 64 asks 256 KiB of shared memory there, more than the GPU has.
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
WIDE_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
BACKWARD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
# The backward's second kernel, the block's dK/dV (query tiles of BLOCK_M, block keys of BLOCK_N): 66 KiB of shared
# memory at head size 256 in bf16, compiled for sm_90a; BLOCK_GRAD_FALLBACKS where a GPU refuses it (float32 doubles it)
BLOCK_GRAD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
BLOCK_GRAD_FALLBACKS = ({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},)
# Smaller settings, tried in order when a launch needs more shared memory than the GPU has (float32, or another GPU).
# The first that launches is kept per shape.
FALLBACK_CONFIGS = (
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
)
TILES_ENV = "CACHEAUG_TRACE_KERNEL_TILES"  # "BM,BN,warps,stages" (both passes) or "FORWARD/BACKWARD", set at import;
# the forward's setting then holds for rows of every size (CONFIG and WIDE_CONFIG); a part "default" keeps the library's


def parse_tiles(spec: str) -> tuple[dict | None, dict | None]:
    """``"64,64,8,2/64,32,8,2"`` (forward/backward; one setting alone: both) as the (forward, backward) settings;
    ``"default"`` for a part: None (the library's settings, the forward's by row size)."""
    parts = spec.split("/")
    try:
        if len(parts) > 2:
            raise ValueError
        cfgs = []
        for part in parts:
            if part.strip() == "default":
                cfgs.append(None)
                continue
            bm, bn, warps, stages = (int(x) for x in part.split(","))
            if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16) or stages < 1:
                raise ValueError
            cfgs.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages})
    except ValueError:
        raise ValueError(
            f"trace kernel tiles {spec!r}: expected BLOCK_M,BLOCK_N,num_warps,num_stages (blocks powers "
            "of two >= 16, warps 1-16, stages >= 1), optionally FORWARD/BACKWARD, e.g. "
            "64,64,8,2/64,32,8,2 or default/64,16,4,2"
        ) from None
    return cfgs[0], cfgs[-1]


if os.environ.get(TILES_ENV):
    _fwd, _bwd = parse_tiles(os.environ[TILES_ENV])
    if _fwd is not None:
        CONFIG.update(_fwd)
        WIDE_CONFIG.update(_fwd)
    if _bwd is not None:
        BACKWARD_CONFIG.update(_bwd)

_OFFS64_FROM = 2**31  # text offsets this large (positions x the cache's stride) run the kernel with 64-bit offsets
_CHOSEN: dict = {}  # (pass name, head size, dtype, device, requested settings) -> the settings that launched


def launch_configs() -> dict:
    """The settings each kind of launch ran with so far: ``{"forward/backward/block-gradient D=.. dtype (requested
    ..)": config}``."""
    return {
        f"{k[0]} D={k[1]} {str(k[2]).removeprefix('torch.')} (requested {','.join(str(v) for _, v in k[4])})": v
        for k, v in _CHOSEN.items()
    }


def _first_launching(name: str, wanted: dict, fallbacks: tuple, D: int, like: torch.Tensor, launch) -> None:
    """``launch(cfg)`` at ``wanted``, else at each of ``fallbacks`` in turn while the GPU refuses a setting for its
    resources (Triton raises that before launching, so a retry writes every output again); the setting that launched
    is kept per (pass, head size, dtype, device, request) and tried first and alone next time."""
    key = (name, D, like.dtype, str(like.device), tuple(wanted.items()))
    candidates = [_CHOSEN[key]] if key in _CHOSEN else [dict(wanted), *fallbacks]
    for i, cfg in enumerate(candidates):
        try:
            launch(cfg)
        except _OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _CHOSEN[key] = cfg
        return


def forward_config(m: int) -> dict:
    """The forward's settings for rows of ``m`` queries: ``WIDE_CONFIG`` above CONFIG's BLOCK_M, else ``CONFIG``."""
    return WIDE_CONFIG if m > CONFIG["BLOCK_M"] else CONFIG


def kernel_available(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like ``t``: CUDA with Triton, or CPU under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _heads(x: torch.Tensor, CL: int) -> torch.Tensor:
    """Queries (or their outputs, gradients) ``[R, H, M, D]`` as ``[R, H, G, CL, D]``, a view (query m: head m // CL,
    mask row m % CL); a tensor of five dimensions as it is."""
    return x if x.dim() == 5 else x.unflatten(2, (x.shape[2] // CL, CL))


def _launch(q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale, do=None, lse=None, o=None, full=None):
    """Run the kernel: forward ``(o, lse)`` or, given ``do``, ``lse`` and the forward's ``o``, backward
    ``(dq, dk_blk, dv_blk)``. ``q`` ``[R, H, M, D]`` or ``[R, H, G, CL, D]`` with any strides (``do`` and ``o``: its
    shape, any strides); ``o`` and ``dq`` come laid out as ``q`` where ``q`` is dense (no copy where the model's
    attention output is a view). ``full`` [R, 2]: each row's text columns that every query sees (none: every tile
    reads the mask)."""
    kb, vb, tk, tv, bias = (x if x.stride(-1) == 1 else x.contiguous() for x in (kb, vb, tk, tv, bias))
    out = torch.empty_like(q)  # q's strides where q is dense: the kernel writes it as it reads q
    if out.stride() != q.stride():  # not dense: read a contiguous copy (out is contiguous then)
        q = q.contiguous()
    full = _no_full(hi) if full is None else full
    seq, start, lo, hi, full = (x.contiguous() for x in (seq, start, lo, hi, full))  # per row
    R, H, CL, D = kb.shape
    M = q.shape[2:-1].numel()
    backward = do is not None
    out_lse = None if backward else torch.empty(R, H, M, dtype=torch.float32, device=q.device)
    dkb = dvb = delta = None  # the block's dK/dV: written by the backward's block kernel only
    if backward:
        do, o = (x if x.stride(-1) == 1 else x.contiguous() for x in (do, o))
        dkb, dvb = (torch.empty((R, H, CL, D), dtype=x.dtype, device=q.device) for x in (kb, vb))
        lse = lse.float().contiguous()
        delta = torch.empty(R, H, M, dtype=torch.float32, device=q.device)  # rowsum(dO x O): the dQ kernel's
    q5, out5, do5, o5 = (None if x is None else _heads(x, CL) for x in (q, out, do, o))
    _first_launching(
        "backward" if backward else "forward",
        BACKWARD_CONFIG if backward else forward_config(M),
        FALLBACK_CONFIGS,
        D,
        q,
        lambda cfg: _run(
            cfg, q5, kb, vb, tk, tv, seq, start, bias, lo, hi, full, scale, do5, o5, lse, delta, out5, out_lse
        ),
    )
    if backward:  # the block's dK/dV, after the dQ kernel (which wrote delta)
        _first_launching(
            "block-gradient",
            BLOCK_GRAD_CONFIG,
            BLOCK_GRAD_FALLBACKS,
            D,
            q,
            lambda cfg: _run_block_grad(cfg, q5, kb, vb, bias, do5, lse, delta, dkb, dvb, scale),
        )
    return (out, dkb, dvb) if backward else (out, out_lse)


def _no_full(hi: torch.Tensor) -> torch.Tensor:
    """A ``full`` range of no columns (every tile then reads and applies the mask)."""
    return torch.stack([hi, hi], dim=1).int()


def _run(cfg, q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, scale, do, o, lse, delta, out, out_lse):
    """The forward, or the backward's dQ (and delta), at ``cfg``; ``q``, ``do``, ``o``, ``out``: ``[R, H, G, CL, D]``."""
    backward = do is not None
    R, H, G, CL, D = q.shape
    M, S = G * CL, tk.shape[2]
    grid = (R, triton.cdiv(M, cfg["BLOCK_M"]), H)
    _prefix_attention_kernel[grid](
        q,
        kb,
        vb,
        tk,
        tv,
        seq,
        start,
        bias,
        lo,
        hi,
        full,
        do if backward else q,
        o if backward else q,
        lse if backward else out_lse,
        delta if backward else out_lse,
        out,
        lse if backward else out_lse,  # (OUT_LSE: written by the forward only)
        *q.stride()[:4],
        *kb.stride()[:3],
        *vb.stride()[:3],
        *tk.stride()[:3],
        *tv.stride()[:3],
        *bias.stride(),
        *(do.stride()[:4] if backward else q.stride()[:4]),
        *(o.stride()[:4] if backward else q.stride()[:4]),
        M,
        CL,
        bias.shape[-1] - CL,
        S,
        float(scale),
        D=D,
        DP=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BACKWARD=backward,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        OFFS64=(S + bias.shape[-1]) * max(abs(tk.stride(2)), abs(tv.stride(2))) + D >= _OFFS64_FROM,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _run_block_grad(cfg, q, kb, vb, bias, do, lse, delta, dkb, dvb, scale):
    """The backward's block dK/dV at ``cfg``: one program per row, tile of block keys and key head."""
    R, H, G, CL, D = q.shape
    _block_grad_kernel[(R, triton.cdiv(CL, cfg["BLOCK_N"]), H)](
        q,
        kb,
        vb,
        bias,
        do,
        lse,
        delta,
        dkb,
        dvb,
        *q.stride()[:4],
        *kb.stride()[:3],
        *vb.stride()[:3],
        *bias.stride(),
        *do.stride()[:4],
        G * CL,
        CL,
        bias.shape[-1] - CL,
        float(scale),
        D=D,
        DP=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


# ---------------------------------------------------------------------------------------------- the torch reference
def gather_rows(text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``text`` ``[B, H, S, D]`` at flat ``index`` ``[R, n]`` (b * S + position): ``[R, H, n, D]``."""
    B, H, S, D = text.shape
    return text.transpose(1, 2).reshape(B * S, H, D)[index].transpose(1, 2)


def _text(t: torch.Tensor, seq: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """Row r's n text columns of ``t`` ``[B, H, S, D]``: ``[R, H, n, D]`` (positions outside 0..S-1 clamped: the
    bias masks them)."""
    S = t.shape[2]
    return gather_rows(t, seq[:, None] * S + (start[:, None] + torch.arange(n, device=t.device)).clamp(0, S - 1))


def _dense(q, kb, vb, tk, tv, seq, start, bias, scale):
    """Float32 scores ``[R, H, M, n + CL]`` and the keys and values they are over (``q``: ``[R, H, M, D]``)."""
    M, CL = q.shape[2], kb.shape[2]
    n = bias.shape[-1] - CL
    k = torch.cat([_text(tk, seq, start, n), kb], dim=2).float()
    v = torch.cat([_text(tv, seq, start, n), vb], dim=2).float()
    rows = torch.arange(M, device=q.device) % CL
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale + bias[:, rows].float()[:, None]
    return s, k, v


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[R, H, G, CL, D]`` (or ``[R, H, M, D]``) as ``[R, H, M, D]``."""
    return x.flatten(2, 3) if x.dim() == 5 else x


def reference_forward(q, kb, vb, tk, tv, seq, start, bias, scale):
    """``(o, lse)`` by gathering the text columns and computing dense attention in float32 (``o``: q's shape)."""
    s, _, v = _dense(_flat(q), kb, vb, tk, tv, seq, start, bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v).to(q.dtype).view(q.shape), lse


def reference_backward(q, kb, vb, tk, tv, seq, start, bias, scale, do, lse, o):
    """``(dq, dk_blk, dv_blk)`` as the backward kernel computes them from the forward's ``o``: dQ over text and
    block, dK/dV of the block (``dq``: q's shape)."""
    shape = q.shape
    q, do, o = _flat(q), _flat(do), _flat(o)
    s, k, v = _dense(q, kb, vb, tk, tv, seq, start, bias, scale)
    p = torch.exp(s - lse[..., None])
    delta = (do.float() * o.float()).sum(-1)
    ds = p * (torch.matmul(do.float(), v.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(ds, k) * scale
    CL = kb.shape[2]
    dk = torch.matmul(ds[..., -CL:].transpose(-1, -2), q.float()) * scale
    dv = torch.matmul(p[..., -CL:].transpose(-1, -2), do.float())
    return dq.to(q.dtype).view(shape), dk.to(kb.dtype), dv.to(vb.dtype)


_warned = False


def _use_kernel(q: torch.Tensor) -> bool:
    global _warned
    if kernel_available(q):
        return True
    if q.is_cuda and not _warned:
        _warned = True
        warnings.warn("cacheaug: trace_kernel found no Triton; the windowed attention runs the (slow) torch reference")
    return False


# ------------------------------------------------------------------------------------------------ the custom ops
# The ops' names carry a version: bump it whenever their autograd changes. torch's compile caches (AOTAutograd's, seen
# with torch 2.13) reuse a compiled backward for an unchanged forward graph, even after the op's backward changed.
# Their outputs are laid out as q (torch.empty_like), so a compiled graph must pass q with the strides it was traced
# with: needs_exact_strides (the default of recent torch; said here for the older ones that have the tag).
_EXACT = (
    {"tags": (torch.Tag.needs_exact_strides,)}
    if hasattr(torch.Tag, "needs_exact_strides") and "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


def _like(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` (q's shape) laid out as the kernel lays its outputs out: ``torch.empty_like(q)``."""
    out = torch.empty_like(q)
    return x if x.stride() == out.stride() else out.copy_(x)


@torch.library.custom_op("cacheaug::prefix_attention_v3", mutates_args=(), **_EXACT)
def _prefix_attention(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    seq: torch.Tensor,
    start: torch.Tensor,
    bias: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    full: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel(q):
        return _launch(q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale, full=full)
    o, lse = reference_forward(q, kb, vb, tk, tv, seq, start, bias, scale)
    return _like(q, o), lse


@_prefix_attention.register_fake
def _(q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, scale):
    return torch.empty_like(q), q.new_empty((*q.shape[:2], q.shape[2:-1].numel()), dtype=torch.float32)


@torch.library.custom_op("cacheaug::prefix_attention_backward_v3", mutates_args=(), **_EXACT)
def _prefix_attention_backward(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    seq: torch.Tensor,
    start: torch.Tensor,
    bias: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    full: torch.Tensor,
    scale: float,
    do: torch.Tensor,
    lse: torch.Tensor,
    o: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_kernel(q):
        return _launch(q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale, do, lse, o, full=full)
    dq, dkb, dvb = reference_backward(q, kb, vb, tk, tv, seq, start, bias, scale, do, lse, o)
    return _like(q, dq), dkb.contiguous(), dvb.contiguous()


@_prefix_attention_backward.register_fake
def _(q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, scale, do, lse, o):
    return (torch.empty_like(q), *(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (kb, vb)))


def _setup_context(ctx, inputs, output):
    q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise RuntimeError(
            "prefix_attention computes no gradient for the text keys; use the sdpa path when the "
            "prefix cache requires grad"
        )
    q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, o, lse = ctx.saved_tensors
    dq, dkb, dvb = _prefix_attention_backward(q, kb, vb, tk, tv, seq, start, bias, lo, hi, full, ctx.scale, do, lse, o)
    return dq, dkb, dvb, None, None, None, None, None, None, None, None, None


_prefix_attention.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention(q, k_blk, v_blk, text_k, text_v, seq, start, bias, lo, hi, scale: float, full=None):
    """Attention of trace rows over their text columns (read in place) and their own block; see the module doc."""
    if torch.is_grad_enabled() and (text_k.requires_grad or text_v.requires_grad):
        raise ValueError(
            "prefix_attention computes no gradient for the text keys: detach them, or use the sdpa "
            "path (windows.trace_attention does so by itself)"
        )
    full = _no_full(hi) if full is None else full
    return _prefix_attention(q, k_blk, v_blk, text_k, text_v, seq, start, bias, lo, hi, full, float(scale))
