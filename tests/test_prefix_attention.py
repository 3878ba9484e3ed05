"""Trace windows through cacheaug's kernel (speed option ``trace_kernel``, cacheaug.prefix_attention): the text keys
read in place, the tiles no query of a row sees skipped, no gradient for the text keys.

The pass must compute exactly what the packed pass, the sdpa windows and inference (augment, then plain decoding)
compute. On the CPU the op runs its torch reference; the Triton kernels themselves run under Triton's interpreter in
a process of their own (tests/prefix_attention_interpret.py), against the reference and inside the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trace_windows import LEVERS, N_A, N_L, POSITIONS, WINDOWED, T
from test_trace_windows import _model as _windows_model

from cacheaug import CoprocessorConfig, build_model, windows
from cacheaug import prefix_attention as pa
from cacheaug.arms import arm_names
from cacheaug.families import SLIDING
from cacheaug.masks import allowed
from cacheaug.speed import apply_speed_options, parse_variant
from cacheaug.testing import assert_compiled_pass_is_one_graph, assert_same_as_packed, max_trace_error, tiny_model


def _model(family="gemma3", init="copy", groups=1, chunk=0, **levers):
    return _windows_model(family, init, groups, chunk, kernel=True, **levers)


def _spy_op(monkeypatch):
    """(rows, folded queries, columns) of every call of the op from the windowed attention."""
    seen, real = [], windows.prefix_attention

    def spy(q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale, full):
        assert full is not None and full.shape == (q.shape[0], 2)  # every call says which columns every query sees
        seen.append((q.shape[0], q.shape[2], bias.shape[-1]))
        return real(q, kb, vb, tk, tv, seq, start, bias, lo, hi, scale, full)

    monkeypatch.setattr(windows, "prefix_attention", spy)
    return seen


def _check_pass(model, seed, monkeypatch):
    """The kernel pass equals augment + decoding trace by trace, every layer of the trace passes ran the op, and it
    equals the sdpa windows (gathered copies) and the packed layout in losses, latents and gradients."""
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(seed))
    seen = _spy_op(monkeypatch)
    worst, out = max_trace_error(model, ids, POSITIONS)
    assert worst <= 1e-4, f"kernel training pass differs from augment+decode by {worst}"
    passes = 1 if model.coprocessor.backbone is None else 2  # pause tokens: no coprocessor pass
    assert len(seen) == passes * model.base.config.num_hidden_layers
    assert_same_as_packed(model, ids, POSITIONS, "trace_kernel", False)
    assert_same_as_packed(model, ids, POSITIONS, "trace_windows", False)
    return out


@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("chunk", [0, 2])
def test_kernel_pass_for_every_family(family, chunk, monkeypatch):
    model = _model(family, chunk=chunk)
    assert model.trace_windows and model.trace_kernel
    out = _check_pass(model, 0, monkeypatch)
    assert (out.token_losses - out.base_token_losses).abs().max() > 1e-2  # the latents matter


@pytest.mark.parametrize("init", [a for a in arm_names() if a != "lora-decoder"])
@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["default", "levers"])
def test_kernel_pass_for_every_arm_and_lever(init, levers, monkeypatch):
    _check_pass(_model(init=init, chunk=2, **levers), 1, monkeypatch)


def test_kernel_within_trace_groups():
    model = _model(groups=2, chunk=2)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 19, 20, 34], [5, 6, 22, 30]])
    worst, _ = max_trace_error(model, ids, positions)
    assert worst <= 1e-4
    assert_same_as_packed(model, ids, positions, "trace_windows", False)


@pytest.mark.parametrize("chunk", [1, 4])
def test_row_ranges_are_tight_and_skip_what_no_query_sees(chunk):
    """lo/hi bound exactly the text columns some query of a row may see: on full layers nothing after the row's last
    point, on sliding ones nothing before the first query's window."""
    model = _model(chunk=chunk)
    g = torch.Generator().manual_seed(3)
    positions = torch.stack([torch.randperm(T - N_A, generator=g)[:8].sort().values for _ in range(2)])
    prefix = [(torch.randn(2, 2, T, 16, generator=g),) * 2]
    L = N_L + N_A - 1
    for layer_type, keys in windows.trace_keys(prefix, positions, L, model.family, 2, chunk, kernel=True).items():
        window = model.family.sliding_window if layer_type == SLIDING else None
        R, CL, cols = keys.bias.shape
        n = cols - CL
        seen = (keys.bias[:, :, :n] == 0).any(1)  # [R, n]
        for r in range(R):
            idx = seen[r].nonzero()[:, 0]
            assert keys.lo[r] == idx.min() and keys.hi[r] == idx.max() + 1
            p = positions.reshape(R, -1)[r]
            text_pos = keys.start[r] + idx
            assert text_pos.max() == p.max()  # the last text key seen is the row's last insertion point
            if window is not None:  # the first is the first query's window start (or the text's)
                assert text_pos.min() == max(0, int(p.min()) + 1 - window + 1)
            # full: the columns every query sees (no mask read there), as the rule gives them: on a sliding layer
            # the last query's window start up to the point, on a full one the text up to the row's first point
            every = (keys.bias[r, :, :n] == 0).all(0)
            f_lo, f_hi = (int(x) for x in keys.full[r])
            assert f_hi > f_lo and every[f_lo:f_hi].all() and not every[:f_lo].any()
            assert f_hi == n or not every[f_hi]
            first_seen = max(0, int(p.max()) + L - window + 1) if window is not None else 0
            assert (keys.start[r] + f_lo, keys.start[r] + f_hi - 1) == (first_seen, p.min())
        # the masks are the rule's: recompute one row's first query against the text from masks.allowed
        q_pos = positions.reshape(R, -1)[0, 0] + 1
        ok = allowed(q_pos, 0, positions.reshape(R, -1)[0, 0], keys.start[0] + torch.arange(n), -1, window)
        ok &= (keys.start[0] + torch.arange(n)) >= 0
        assert torch.equal(keys.bias[0, 0, :n] == 0, ok)


def test_text_keys_that_take_gradients_run_the_sdpa_path(monkeypatch):
    """The op computes no gradient for the text keys: where they require one, the rows take the sdpa path."""
    model = _model(chunk=2)
    g = torch.Generator().manual_seed(4)
    positions = POSITIONS
    text = [(torch.randn(2, 2, T, 16, generator=g).requires_grad_(), torch.randn(2, 2, T, 16, generator=g))]
    keys = windows.trace_keys(text, positions, N_L, model.family, 2, 2, kernel=True)[SLIDING]
    seen = _spy_op(monkeypatch)

    class Layer:
        layer_idx = 0

    q = torch.randn(8, 4, N_L, 16, generator=g)
    kb, vb = torch.randn(8, 2, N_L, 16, generator=g), torch.randn(8, 2, N_L, 16, generator=g)
    out = windows.trace_attention(Layer, q, kb, vb, keys)[0]
    assert not seen
    out.sum().backward()
    assert text[0][0].grad.abs().sum() > 0
    with torch.no_grad():
        plain = windows.trace_attention(Layer, q, kb, vb, keys)[0]  # no gradient wanted: the op
    assert len(seen) == 1
    torch.testing.assert_close(plain, out.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no gradient for the text keys"):
        pa.prefix_attention(q, kb, vb, text[0][0], text[0][1], keys.seq, keys.start, keys.bias, keys.lo, keys.hi, 1.0)


def test_op_gradients_equal_autograd_through_dense_attention():
    """The custom op's backward (dQ over text and block, dK/dV of the block) against autograd through sdpa on the
    gathered keys, eager and compiled."""
    g = torch.Generator().manual_seed(5)
    R, H, G, C, L, D, B, S, n = 5, 2, 2, 2, 5, 16, 2, 40, 24
    CL, M = C * L, G * C * L
    q, kb, vb = (torch.randn(R, H, x, D, generator=g).requires_grad_() for x in (M, CL, CL))
    tk, tv = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    seq, start = torch.randint(0, B, (R,), generator=g), torch.randint(-10, S - n + 5, (R,), generator=g)
    ok = torch.rand(R, CL, n + CL, generator=g) < 0.5
    ok[:, :, n] = True
    bias = torch.zeros(ok.shape).masked_fill_(~ok, torch.finfo(torch.float32).min)
    lo, hi = torch.zeros(R, dtype=torch.int32), torch.full((R,), n, dtype=torch.int32)
    w = torch.randn(R, H, M, D, generator=g)

    def dense(q, kb, vb):
        k = torch.cat([pa._text(tk, seq, start, n), kb], 2)
        v = torch.cat([pa._text(tv, seq, start, n), vb], 2)
        mask = bias[:, torch.arange(M) % CL][:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)

    def op(q, kb, vb):
        return pa.prefix_attention(q, kb, vb, tk, tv, seq, start, bias, lo, hi, 0.3)[0]

    want = torch.autograd.grad((dense(q, kb, vb) * w).sum(), (q, kb, vb))
    compiled = torch.compile(lambda *x: (op(*x) * w).sum(), fullgraph=True)
    for loss in ((op(q, kb, vb) * w).sum(), compiled(q, kb, vb)):
        for got, ref in zip(torch.autograd.grad(loss, (q, kb, vb)), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # slow tier: interpreter / compile
def test_compiled_kernel_pass_is_one_graph_equal_to_eager():
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    assert_compiled_pass_is_one_graph(_model(chunk=2), ids, POSITIONS)


@pytest.mark.slow  # slow tier: interpreter / compile
def test_triton_kernels_under_the_interpreter():
    """The kernels (forward, dQ) against the reference at several shapes and tiles, and inside the model against the
    packed pass; in a process of its own with TRITON_INTERPRET=1 (the kernels are defined under it)."""
    import triton  # noqa: F401  (the test extra installs it: a missing Triton fails here rather than skipping)

    script = Path(__file__).with_name("prefix_attention_interpret.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" ok") == 9, run.stdout  # five kernel cases, wide rows, the fallback, two model families


@pytest.mark.slow  # slow tier: interpreter / compile
def test_tile_settings_from_the_environment():
    """CACHEAUG_TRACE_KERNEL_TILES sets the kernels' tiles at import (forward/backward, or one for both); a malformed
    value is refused with the expected form."""
    fwd, bwd = pa.parse_tiles("128,64,8,2/64,32,8,1")
    assert fwd == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    assert bwd == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    assert pa.parse_tiles("32,32,4,1")[0] == pa.parse_tiles("32,32,4,1")[1]
    assert pa.parse_tiles("default/64,16,4,2") == (
        None,
        {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
    )
    for bad in ("64,64,4", "48,64,4,2", "64,64,3,2", "64,64,4,2/64,64,4,2/1,1,1,1", "a,b,c,d"):
        with pytest.raises(ValueError, match="BLOCK_M,BLOCK_N,num_warps,num_stages"):
            pa.parse_tiles(bad)
    code = (
        "from cacheaug import prefix_attention as pa; "
        "print(pa.CONFIG['BLOCK_M'], pa.WIDE_CONFIG['num_warps'], pa.BACKWARD_CONFIG['num_stages'])"
    )
    env = {**os.environ, pa.TILES_ENV: "128,64,2,2/64,32,8,1", "PYTHONPATH": str(Path(pa.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["128", "2", "1"], run.stdout + run.stderr  # every row size
    env[pa.TILES_ENV] = "default/64,16,4,3"  # the library's forward (by row size), the backward set
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == [str(pa.CONFIG["BLOCK_M"]), str(pa.WIDE_CONFIG["num_warps"]), "3"], run.stderr
    env[pa.TILES_ENV] = "64x64"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "expected BLOCK_M,BLOCK_N,num_warps,num_stages" in run.stderr


def test_options_and_variants():
    from cacheaug.train import TrainConfig

    assert parse_variant("sdpa+graphs+keeplogits+k+c8") == {
        **parse_variant("sdpa+graphs+keeplogits+w+c8"),
        "trace_kernel": True,
    }
    assert parse_variant("sdpa+w")["trace_kernel"] is False
    assert TrainConfig.from_flat(n_traces=8, trace_chunk=4, trace_kernel=True).trace_kernel
    model = _model()
    model.trace_windows = False  # turning windows off turns the kernel off with them
    assert not model.trace_kernel
    eager = build_model(tiny_model("gemma3", "eager"), CoprocessorConfig(n_latents=N_L, n_traces=4))
    with pytest.raises(ValueError, match="Use trace_chunk instead"):
        apply_speed_options(eager, trace_kernel=True)


def test_pick_tiles_sums_over_the_models_layers(tmp_path):
    """experiments/pick_tiles.py: the settings with the least time summed over the model's layers (per pass, only
    settings timed at every shape), printed as CACHEAUG_TRACE_KERNEL_TILES takes them."""
    rows = []
    for layer, ms in (("sliding_attention", {"a": 1.0, "b": 1.2}), ("full_attention", {"a": 3.0, "b": 1.0})):
        for passes in ("forward", "forward+backward"):
            for tiles, t in ms.items():
                cfg = {"a": "64,64,4,2", "b": "128,64,8,2"}[tiles]
                rows.append(
                    {
                        "layout": "kernel",
                        "layer": layer,
                        "L": 31,
                        "pass": passes,
                        "kernel": f"triton {cfg}",
                        "ms": t if passes == "forward" else 2 * t,
                    }
                )
    rows.append({"layout": "windows", "layer": "full_attention", "L": 31, "kernel": "cudnn", "ms": 0.1})
    rows.append(
        {
            "layout": "kernel",
            "layer": "full_attention",
            "L": 31,
            "pass": "forward+backward, mask on every tile",
            "kernel": "triton (defaults)",
            "ms": 0.1,
        }
    )
    rows.append(
        {
            "layout": "kernel",
            "layer": "sliding_attention",
            "L": 31,
            "pass": "forward",  # timed at one shape
            "kernel": "triton 32,32,4,1",
            "ms": 0.01,
        }
    )
    result = tmp_path / "ta.json"
    result.write_text(json.dumps({"rows": rows}))
    script = Path(__file__).parents[1] / "experiments" / "pick_tiles.py"

    def pick(*extra):
        run = subprocess.run(
            [sys.executable, str(script), str(result), *extra], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        spec = run.stdout.strip()
        assert pa.parse_tiles(spec)  # a value the environment variable takes
        return spec

    assert pick() == "128,64,8,2/128,64,8,2"  # b: 15 x 1.2 + 3 x 1.0 = 21 against a: 15 x 1.0 + 3 x 3.0 = 24
    assert pick("--full-layers", "0") == "64,64,4,2/64,64,4,2"  # sliding layers alone: a
    assert pick("--backward-only") == "default/128,64,8,2"
    # a setting the GPU refused ran at a fallback (benchmark's "launched"): its rows time another setting, left out
    rows += [
        {**r, "kernel": "triton 32,32,4,1", "launched": "16,16,2,1", "ms": 0.001}
        for r in rows
        if r["kernel"] == "triton 64,64,4,2"
    ]
    result.write_text(json.dumps({"rows": rows}))
    assert pick() == "128,64,8,2/128,64,8,2"
    # a second block size at which setting a is faster everywhere: the overall pick shifts, --explain names each size's
    rows += [
        {**r, "L": 16, "ms": r["ms"] * (0.01 if r["kernel"] == "triton 64,64,4,2" else 1.0)}
        for r in rows
        if r["layout"] == "kernel" and r["kernel"] in ("triton 64,64,4,2", "triton 128,64,8,2")
    ]
    result.write_text(json.dumps({"rows": rows}))
    assert pick() == "64,64,4,2/64,64,4,2"  # a: 24 + 0.24 against b: 21 + 21
    run = subprocess.run(
        [sys.executable, str(script), str(result), "--explain"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    by_size = json.loads(run.stderr)["fastest per block size L"]
    assert by_size["forward"] == {"16": "64,64,4,2", "31": "128,64,8,2"}, by_size


def test_queries_and_output_stay_in_the_models_layout(monkeypatch):
    """The op gets the queries as a view of the attention's [N, L, heads, D] projections (no copy) and its output,
    laid out as they are, goes back to the layer as a view: the attention output is contiguous [N, L, heads, D]
    without a copy (eager; a compiled graph hands the op the same strides: its ops need exact strides)."""
    seen, real = [], windows.prefix_attention

    def spy(q, *args):
        out = real(q, *args)
        seen.append((q.dim(), q._base is not None, out[0].stride() == q.stride(), out[0].data_ptr()))
        return out

    monkeypatch.setattr(windows, "prefix_attention", spy)
    returned, real_attention = [], windows.trace_attention

    def outer(*args, **kwargs):
        out = real_attention(*args, **kwargs)
        returned.append((out[0].is_contiguous(), out[0].data_ptr()))
        return out

    monkeypatch.setattr(windows, "trace_attention", outer)
    model = _model(chunk=2)
    ids = torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(0))
    model(ids, positions=POSITIONS).loss.backward()
    assert seen and all(s[:3] == (5, True, True) for s in seen), seen[:3]
    # the layer gets the op's own output back, contiguous in [N, L, heads, D]: no copy in between
    assert [r[1] for r in returned] == [s[3] for s in seen] and all(r[0] for r in returned)
