"""The Triton kernels of cacheaug.prefix_attention (forward; backward: dQ and the block's dK/dV) run under Triton's
interpreter on the CPU, against the torch reference and, inside the model, against the packed training pass. Run by
tests/test_prefix_attention.py in a process of its own (TRITON_INTERPRET must be set before the kernels are defined);
exits non-zero on a mismatch."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from cacheaug import prefix_attention as pa  # noqa: E402
from cacheaug.windows import _seen_by_all  # noqa: E402


def random_case(
    g, R=5, H=2, G=2, C=1, L=5, D=16, B=2, S=40, n=24, dense=(0, 0), dtype=torch.float32, model_layout=False
):
    """Random inputs of the op: rows starting before, inside and past the text, a random mask in which every query
    sees at least its first block key and every text column of ``dense`` that exists, and the tightest [lo, hi) of
    text columns that the mask allows. ``model_layout``: the queries ``[R, H, G, CL, D]`` as windows.py passes them,
    a view of the model's projections ``[R x C, L, H x G, D]``."""
    CL, M = C * L, G * C * L
    q = torch.randn(R, H, M, D, generator=g).to(dtype)
    if model_layout:
        q = torch.randn(R * C, L, H * G, D, generator=g).to(dtype).view(R, C, L, H, G, D).permute(0, 3, 4, 1, 2, 5)
        q = q.reshape(R, H, G, CL, D)
        assert q._base is not None  # a view
    kb, vb = (torch.randn(R, H, CL, D, generator=g).to(dtype) for _ in range(2))
    tk, tv = (torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(2))
    seq = torch.randint(0, B, (R,), generator=g)
    start = torch.randint(-10, S - n + 5, (R,), generator=g)
    ok = torch.rand(R, CL, n + CL, generator=g) < 0.4
    ok[:, :, dense[0] : dense[1]] = True
    pos = start[:, None] + torch.arange(n)
    ok[:, :, :n] &= ((pos >= 0) & (pos < S))[:, None]
    ok[:, :, n] = True
    seen = ok[:, :, :n].any(1)
    lo = torch.where(seen.any(1), seen.int().argmax(1), 0).int()
    hi = torch.where(seen.any(1), n - seen.flip(1).int().argmax(1), 0).int()
    bias = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, torch.finfo(dtype).min)
    # as the model passes them: blocks as transposed views of [R, CL, H, D], positions as a column of a matrix
    kb, vb = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kb, vb))
    start = torch.stack([start, start + 1], dim=1)[:, 0]
    return q, kb, vb, tk, tv, seq, start, bias, lo, hi, D**-0.5


def full_of(args) -> torch.Tensor:
    """The ``full`` ranges of a case: each row's first run of text columns every query sees (what windows.py gives)."""
    kb, bias = args[1], args[7]
    return _seen_by_all(bias[:, :, : bias.shape[-1] - kb.shape[2]] == 0)


def check_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [  # (op shapes, tile sizes)
        (dict(), dict(BLOCK_M=16, BLOCK_N=16)),
        # a head size not a power of two; columns 5..39 seen by every query (tiles without the mask)
        (dict(C=3, L=7, G=4, D=24, n=50, S=48, dense=(5, 40), model_layout=True), dict(BLOCK_M=16, BLOCK_N=16)),
        (dict(C=2, L=9, G=1, D=32, n=70, S=64, R=3, dense=(20, 70)), dict(BLOCK_M=32, BLOCK_N=16)),  # block: 2 tiles
        (dict(C=2, L=5, G=3, D=16, n=30, S=32, model_layout=True), dict(BLOCK_M=16, BLOCK_N=16)),
        (dict(L=31, G=4, D=16, n=140, S=140, R=2, dense=(0, 140)), dict(BLOCK_M=64, BLOCK_N=64)),  # default tiles
    ]  # (float32 only: the interpreter's tl.dot misreads bfloat16; bf16 is checked on the GPU, check_equivalence.py)
    defaults = dict(pa.CONFIG), dict(pa.WIDE_CONFIG), dict(pa.BACKWARD_CONFIG), dict(pa.BLOCK_GRAD_CONFIG)
    skips_checked = 0
    for shapes, tiles in cases:
        pa.CONFIG.update(tiles)
        pa.WIDE_CONFIG.update(tiles)
        pa.BACKWARD_CONFIG.update(tiles)
        # the block's dK/dV over several tiles of block keys and of queries (the last ones partial) where tiles are small
        pa.BLOCK_GRAD_CONFIG.update(tiles if tiles["BLOCK_N"] == 16 else defaults[3])
        args = random_case(g, **shapes)
        tol = dict(rtol=1e-5, atol=1e-5)
        o, lse = pa._launch(*args)
        ref_o, ref_lse = pa.reference_forward(*args[:8], args[10])
        torch.testing.assert_close(o, ref_o, **tol)
        torch.testing.assert_close(lse, ref_lse, **tol)
        assert o.stride() == args[0].stride(), (o.stride(), args[0].stride())  # laid out as q (a view's layout too)
        do = torch.randn(o.shape, generator=g)  # contiguous: strides other than o's where q is the model's view
        ref_grads = pa.reference_backward(*args[:8], args[10], do, ref_lse, ref_o)
        grads = pa._launch(*args, do, ref_lse, o)
        assert grads[0].stride() == args[0].stride()
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, **tol)
        # the same with the columns every query sees given (their tiles then skip the mask), forward and backward
        full = full_of(args)
        bn = tiles["BLOCK_N"]
        if shapes.get("dense"):  # some row has a whole tile of such columns
            assert ((full[:, 1] // bn) > (full[:, 0] + bn - 1) // bn).any(), full
        o_full, lse_full = pa._launch(*args, full=full)
        torch.testing.assert_close(o_full, ref_o, **tol)
        torch.testing.assert_close(lse_full, ref_lse, **tol)
        for got, want in zip(pa._launch(*args, do, ref_lse, o, full=full), ref_grads):
            torch.testing.assert_close(got, want, **tol)
        pa._OFFS64_FROM = 0  # the same with 64-bit text offsets (what a long text with a wide cache stride takes)
        try:
            torch.testing.assert_close(pa._launch(*args, full=full)[0], ref_o, **tol)
        finally:
            pa._OFFS64_FROM = 2**31
        wrong = torch.stack([args[8], args[9]], dim=1).int()  # [lo, hi): seen by some query, not by every one
        if not torch.equal(wrong, full):  # ... and skipping the mask is real: called full there, the result differs
            assert not torch.allclose(pa._launch(*args, full=wrong)[0], o)
            skips_checked += 1
        # the skipped tiles matter: a row whose [lo, hi) leaves out a column it sees gives another result
        q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale = args
        cut = hi.clone()
        cut[0] = lo[0]
        if hi[0] > lo[0]:
            assert not torch.allclose(pa._launch(q, kb, vb, tk, tv, seq, start, bias, lo, cut, scale)[0][0], o[0])
        print("kernels", shapes, tiles, "ok")
    assert skips_checked >= 2, skips_checked
    pa.CONFIG.update(defaults[0])
    pa.WIDE_CONFIG.update(defaults[1])
    pa.BACKWARD_CONFIG.update(defaults[2])
    pa.BLOCK_GRAD_CONFIG.update(defaults[3])


def check_wide_rows() -> None:
    """Rows of more queries than CONFIG's tile run the forward at WIDE_CONFIG, rows of at most that many at CONFIG;
    both give the reference's values."""
    g = torch.Generator().manual_seed(2)
    defaults = dict(pa.CONFIG), dict(pa.WIDE_CONFIG)
    pa.CONFIG.update(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    pa.WIDE_CONFIG.update(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    try:
        pa._CHOSEN.clear()
        for shapes in (dict(C=2, L=7, G=2, D=16, n=30, S=32), dict(C=1, L=4, G=4, D=16, n=30, S=32)):  # M 28, 16
            args = random_case(g, **shapes)
            o, lse = pa._launch(*args)
            ref_o, ref_lse = pa.reference_forward(*args[:8], args[10])
            torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
        assert sorted(cfg["BLOCK_M"] for cfg in pa.launch_configs().values()) == [16, 32], pa.launch_configs()
    finally:
        pa.CONFIG.update(defaults[0])
        pa.WIDE_CONFIG.update(defaults[1])
        pa._CHOSEN.clear()
    print("wide rows ok")


def refusing(real, tried: list, above: int, asked: int = 262144, has: int = 232448):
    """A stand-in for ``real`` (a launcher taking ``cfg`` first) that records each setting's BLOCK_N in ``tried`` and
    refuses, as Triton does for shared memory, every setting with BLOCK_N above ``above``."""

    def launch(cfg, *a):
        tried.append(cfg["BLOCK_N"])
        if cfg["BLOCK_N"] > above:
            raise pa._OutOfResources(asked, has, "shared memory")
        return real(cfg, *a)

    return launch


def check_fallback() -> None:
    """A launch refused for shared memory (as Triton raises it) falls back to the next smaller settings, gives the
    same result, and the settings that launched are kept for that shape; a refusal of every setting is raised."""
    g = torch.Generator().manual_seed(1)
    args = random_case(g, D=32)
    want = pa.reference_forward(*args[:8], args[10])[0]
    real, tried = pa._run, []
    refuse_wide = refusing(real, tried, 32)
    pa._run = refuse_wide
    try:
        pa._CHOSEN.clear()
        torch.testing.assert_close(pa._launch(*args)[0], want, rtol=1e-5, atol=1e-5)
        assert tried == [64, 32], tried
        assert pa.launch_configs()["forward D=32 float32 (requested 64,64,4,2)"]["BLOCK_N"] == 32, pa.launch_configs()
        do = torch.randn(want.shape, generator=g)
        lse = pa.reference_forward(*args[:8], args[10])[1]
        tried.clear()
        pa._launch(*args, do, lse, want)
        assert tried == [32], tried  # the backward's own settings (BACKWARD_CONFIG: 64 x 32) launch at once
        tried.clear()
        torch.testing.assert_close(pa._launch(*args)[0], want, rtol=1e-5, atol=1e-5)
        assert tried == [32], tried  # the kept settings, tried first and alone
        pa._run = lambda cfg, *a: refuse_wide({"BLOCK_N": 99}, *a)
        pa._CHOSEN.clear()
        try:
            pa._launch(*args)
        except pa._OutOfResources:
            pass
        else:
            raise AssertionError("a launch refused at every setting must raise")
    finally:
        pa._run = real
        pa._CHOSEN.clear()
    # the backward's block-gradient kernel falls back on its own (BLOCK_GRAD_FALLBACKS), with the same gradients
    real_blk, tried = pa._run_block_grad, []
    do = torch.randn(want.shape, generator=g)
    o, lse = pa.reference_forward(*args[:8], args[10])
    ref = pa.reference_backward(*args[:8], args[10], do, lse, o)
    pa._run_block_grad = refusing(real_blk, tried, 16, 135168, 101376)
    try:
        pa._CHOSEN.clear()
        for got, ref_g in zip(pa._launch(*args, do, lse, o), ref):
            torch.testing.assert_close(got, ref_g, rtol=1e-5, atol=1e-5)
        assert tried == [pa.BLOCK_GRAD_CONFIG["BLOCK_N"], 16], tried
        assert pa.launch_configs()["block-gradient D=32 float32 (requested 32,32,4,1)"]["BLOCK_N"] == 16
        tried.clear()
        pa._launch(*args, do, lse, o)
        assert tried == [16], tried  # kept
    finally:
        pa._run_block_grad = real_blk
        pa._CHOSEN.clear()
    print("fallback ok")


def check_model() -> None:
    """The training pass with trace_kernel runs the kernels (spied) and equals the packed pass."""
    from cacheaug import CoprocessorConfig, build_model
    from cacheaug.speed import apply_speed_options
    from cacheaug.testing import assert_same_as_packed, perturb_trainable, tiny_model

    launches, unmasked = [], []
    real = pa._launch
    defaults = dict(pa.CONFIG), dict(pa.WIDE_CONFIG), dict(pa.BACKWARD_CONFIG)
    for cfg in (pa.CONFIG, pa.WIDE_CONFIG, pa.BACKWARD_CONFIG):  # tiles small enough for the rows' full ranges
        cfg.update(BLOCK_M=16, BLOCK_N=8)

    def spy(*args, full=None, **kwargs):
        launches.append("backward" if len(args) > 11 else "forward")
        unmasked.append(bool(((full[:, 1] // 8) > (full[:, 0] + 7) // 8).any()))  # a whole tile without the mask
        return real(*args, full=full, **kwargs)

    pa._launch = spy
    for family in ("gemma3", "qwen3"):
        model = build_model(tiny_model(family, "sdpa"), CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4))
        perturb_trainable(model)
        apply_speed_options(model, trace_chunk=2, trace_kernel=True)
        ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
        positions = torch.tensor([[0, 7, 20, 34], [3, 12, 12, 30]])
        launches.clear()
        assert_same_as_packed(model, ids, positions, "trace_windows", False)
        layers = model.base.config.num_hidden_layers
        assert launches.count("forward") == 2 * layers and launches.count("backward") == 2 * layers, launches
        assert any(unmasked), "no row had a whole tile of columns every query sees"
        unmasked.clear()
        print("model", family, "ok")
    pa._launch = real
    for cfg, default in zip((pa.CONFIG, pa.WIDE_CONFIG, pa.BACKWARD_CONFIG), defaults):
        cfg.update(default)


if __name__ == "__main__":
    check_kernels()
    check_wide_rows()
    check_fallback()
    check_model()
    sys.exit(0)
