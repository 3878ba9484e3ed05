"""The Triton kernels of shared-prefix attention (:mod:`cacheaug.prefix_attention` states the op, launches them and
holds the torch reference they are tested against).

``_prefix_attention_kernel``: one program per (row, tile of queries, key head): the forward with the online softmax,
or (``BACKWARD``) dQ from the saved log-sum-exp, over the row's text columns read in place from the prefix cache, then
its own block. ``_block_grad_kernel``: the backward's dK/dV of the row's block (one program per row, tile of block
keys and key head). benchmarks/kernel_registers.py compiles them ahead of time (``--module`` takes another revision
of this file).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the torch reference runs instead
    triton = None

if triton is not None:

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, bias, valid, scale, PREC: tl.constexpr):
        """One tile of keys for the forward pass: scores, then the running max, sum and output."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias
        s = tl.where(valid, s, -3.4028234663852886e38)  # finite: a tile with nothing visible makes no NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _probs_and_grads(q, do, lse, delta, k, v, bias, valid, scale, PREC: tl.constexpr):
        """One tile of queries x keys in backward: the probabilities again from the saved log-sum-exp, and the
        scores' gradients."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias
        s = tl.where(valid, s, -3.4028234663852886e38)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        return p, p * (dp - delta[:, None])

    @triton.jit
    def _grad_step(dq, q, do, lse, delta, k, v, bias, valid, scale, PREC: tl.constexpr):
        """One tile of keys for backward: dQ's share."""
        _, ds = _probs_and_grads(q, do, lse, delta, k, v, bias, valid, scale, PREC)
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    @triton.jit
    def _prefix_attention_kernel(
        Q,
        KB,
        VB,
        TK,
        TV,
        SEQ,
        START,
        BIAS,
        LO,
        HI,
        FULL,
        DO,
        O,
        LSE,
        DELTA,
        OUT,
        OUT_LSE,
        sq_r,
        sq_h,
        sq_g,
        sq_i,
        skb_r,
        skb_h,
        skb_n,
        svb_r,
        svb_h,
        svb_n,
        stk_b,
        stk_h,
        stk_s,
        stv_b,
        stv_h,
        stv_s,
        sb_r,
        sb_m,
        sb_n,
        sdo_r,
        sdo_h,
        sdo_g,
        sdo_i,
        so_r,
        so_h,
        so_g,
        so_i,
        M,
        CL,
        N,
        S,
        scale,
        D: tl.constexpr,
        DP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BACKWARD: tl.constexpr,
        PREC: tl.constexpr,
        OFFS64: tl.constexpr,
    ):
        """Forward (OUT = o, OUT_LSE = lse) or, with BACKWARD, dQ (OUT = dq) and DELTA (rowsum(dO x O), which the
        block's dK/dV then reads: _block_grad_kernel) of one tile of queries of one row. Query m of a row is
        (head g, row i of the mask) = (m // CL, m % CL), at g x s_g + i x s_i in Q, DO and O; OUT is laid out as Q."""
        r = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        h = tl.program_id(2).to(tl.int64)
        offs_d = tl.arange(0, DP)
        m_ok = offs_m < M
        d_ok = offs_d < D
        q_mask = m_ok[:, None] & d_ok[None, :]
        g_m, i_m = offs_m // CL, offs_m % CL
        q_rows = g_m * sq_g + i_m * sq_i  # (OUT: the same)
        q = tl.load(Q + r * sq_r + h * sq_h + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
        bias_rows = BIAS + r * sb_r + i_m[:, None] * sb_m
        b = tl.load(SEQ + r).to(tl.int64)
        if OFFS64:  # a text tile's offsets in 64 bits only where 32 do not hold them (fewer registers, less spilling)
            start = tl.load(START + r).to(tl.int64)
        else:
            start = tl.load(START + r).to(tl.int32)
        lo = tl.load(LO + r)
        hi = tl.load(HI + r)
        full_lo = tl.load(FULL + 2 * r)
        full_hi = tl.load(FULL + 2 * r + 1)
        tk = TK + b * stk_b + h * stk_h
        tv = TV + b * stv_b + h * stv_h
        kb = KB + r * skb_r + h * skb_h
        vb = VB + r * svb_r + h * svb_h
        if BACKWARD:
            do = tl.load(
                DO + r * sdo_r + h * sdo_h + (g_m * sdo_g + i_m * sdo_i)[:, None] + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            o = tl.load(
                O + r * so_r + h * so_h + (g_m * so_g + i_m * so_i)[:, None] + offs_d[None, :], mask=q_mask, other=0.0
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            tl.store(DELTA + (r * tl.num_programs(2) + h) * M + offs_m, delta, mask=m_ok)
            lse = tl.load(LSE + (r * tl.num_programs(2) + h) * M + offs_m, mask=m_ok, other=0.0)
            acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # the text columns some query of the row may see, read in place from the prefix cache; the mask is not read
        # on the tiles inside [full_lo, full_hi), whose columns every query of the row sees (it is 0 there)
        f0 = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        f1 = (full_hi // BLOCK_N) * BLOCK_N
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            pos = start + offs_n
            n_ok = (offs_n >= lo) & (offs_n < hi) & (pos >= 0) & (pos < S)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(tk + pos[:, None] * stk_s + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(tv + pos[:, None] * stv_s + offs_d[None, :], mask=kv_mask, other=0.0)
            valid = m_ok[:, None] & n_ok[None, :]
            read = (offs_n < f0) | (offs_n >= f1)  # (tiles lie wholly inside or outside [f0, f1))
            bias = tl.load(bias_rows + offs_n[None, :] * sb_n, mask=valid & read[None, :], other=0.0).to(tl.float32)
            if BACKWARD:
                acc = _grad_step(acc, q, do, lse, delta, k, v, bias, valid, scale, PREC)
            else:
                acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, bias, valid, scale, PREC)
        # the row's own block
        for n0 in range(0, CL, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < CL
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(kb + offs_n[:, None] * skb_n + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vb + offs_n[:, None] * svb_n + offs_d[None, :], mask=kv_mask, other=0.0)
            valid = m_ok[:, None] & n_ok[None, :]
            bias = tl.load(bias_rows + (N + offs_n)[None, :] * sb_n, mask=valid, other=0.0).to(tl.float32)
            if BACKWARD:
                acc = _grad_step(acc, q, do, lse, delta, k, v, bias, valid, scale, PREC)
            else:
                acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, bias, valid, scale, PREC)
        out = OUT + r * sq_r + h * sq_h + q_rows[:, None] + offs_d[None, :]  # laid out as Q
        if BACKWARD:
            tl.store(out, (acc * scale).to(OUT.dtype.element_ty), mask=q_mask)
        else:
            tl.store(out, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=q_mask)
            tl.store(OUT_LSE + (r * tl.num_programs(2) + h) * M + offs_m, m_i + tl.log(l_i), mask=m_ok)

    @triton.jit
    def _block_grad_kernel(
        Q,
        KB,
        VB,
        BIAS,
        DO,
        LSE,
        DELTA,
        DKB,
        DVB,
        sq_r,
        sq_h,
        sq_g,
        sq_i,
        skb_r,
        skb_h,
        skb_n,
        svb_r,
        svb_h,
        svb_n,
        sb_r,
        sb_m,
        sb_n,
        sdo_r,
        sdo_h,
        sdo_g,
        sdo_i,
        M,
        CL,
        N,
        scale,
        D: tl.constexpr,
        DP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """dK/dV of one tile of a row's block keys (DKB/DVB contiguous [R, H, CL, D]), from every query of the row:
        the program owns its keys, so nothing is summed across programs (no atomics, no float32 buffers). DELTA is
        the dQ kernel's, launched before."""
        r = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        h = tl.program_id(2).to(tl.int64)
        offs_d = tl.arange(0, DP)
        n_ok = offs_n < CL
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        k = tl.load(KB + r * skb_r + h * skb_h + offs_n[:, None] * skb_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VB + r * svb_r + h * svb_h + offs_n[:, None] * svb_n + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        bias_cols = BIAS + r * sb_r + (N + offs_n)[None, :] * sb_n
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            q_mask = m_ok[:, None] & (offs_d < D)[None, :]
            g_m, i_m = offs_m // CL, offs_m % CL
            q = tl.load(
                Q + r * sq_r + h * sq_h + (g_m * sq_g + i_m * sq_i)[:, None] + offs_d[None, :], mask=q_mask, other=0.0
            )
            do = tl.load(
                DO + r * sdo_r + h * sdo_h + (g_m * sdo_g + i_m * sdo_i)[:, None] + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            lse = tl.load(LSE + (r * tl.num_programs(2) + h) * M + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + (r * tl.num_programs(2) + h) * M + offs_m, mask=m_ok, other=0.0)
            valid = m_ok[:, None] & n_ok[None, :]
            bias = tl.load(bias_cols + i_m[:, None] * sb_m, mask=valid, other=0.0).to(tl.float32)
            p, ds = _probs_and_grads(q, do, lse, delta, k, v, bias, valid, scale, PREC)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PREC)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC)
        out = (r * tl.num_programs(2) + h) * CL * D + offs_n[:, None] * D + offs_d[None, :]  # DKB/DVB: [R, H, CL, D]
        tl.store(DKB + out, (dk * scale).to(DKB.dtype.element_ty), mask=kv_mask)
        tl.store(DVB + out, dv.to(DVB.dtype.element_ty), mask=kv_mask)
