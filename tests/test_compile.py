"""The compiled training pass (cacheaug.speed, compile_step) is one graph and computes what the eager pass does."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled graphs (and the fake tensors they keep) must not leak into other tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


from cacheaug import CoprocessorConfig, build_model
from cacheaug.speed import apply_speed_options
from cacheaug.testing import perturb_trainable, tiny_model

CFG = dict(n_latents=3, n_ahead=4, n_traces=4, lora_rank=4)


def _losses_and_grads(model, ids, positions):
    model.zero_grad(set_to_none=True)
    out = model(ids, positions=positions, return_base_losses=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


LEVERS = dict(position_scheme="shared", reread_last=True, echo_residual=True, readout="pre_norm", offset_decay=0.7)


_SLOW = pytest.mark.slow  # the fast tier keeps one compiled arm; the slow tier every arm, family and lever


@pytest.mark.parametrize(
    "family,init,levers",
    [
        ("gemma3", "copy", {}),
        pytest.param("qwen3", "copy", {}, marks=_SLOW),
        pytest.param("gemma3", "lora-decoder", {}, marks=_SLOW),
        pytest.param("gemma3", "copy", LEVERS, marks=_SLOW),
        pytest.param("gemma3", "lora", LEVERS, marks=_SLOW),
        pytest.param("gemma3", "pause", {**LEVERS, "readout": "final_norm"}, marks=_SLOW),
    ],
)
def test_compiled_training_pass_is_one_graph_equal_to_eager(family, init, levers):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build_model(tiny_model(family), CoprocessorConfig(**CFG, init=init, **levers))
    perturb_trainable(model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 9, 20, 35], [3, 4, 17, 30]])
    eager, g_eager = _losses_and_grads(model, ids, positions)
    # aot_eager: dynamo + AOT autograd (the graph inductor would get) without code generation, so the test is fast;
    # fullgraph=True fails on any graph break, e.g. a host sync creeping into the pass
    model.compile_training(backend="aot_eager", fullgraph=True)
    for step in range(2):  # the second call must reuse the graph (same shapes, new positions)
        pos = positions if step == 0 else positions.flip(0)
        compiled, g_comp = _losses_and_grads(model, ids, pos)
        if step == 0:
            torch.testing.assert_close(compiled.token_losses, eager.token_losses, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled.base_token_losses, eager.base_token_losses, rtol=1e-5, atol=1e-5)
            assert g_comp.keys() == g_eager.keys() and g_comp
            for name in g_eager:
                torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():  # evaluation stays eager
        assert model(ids, positions=positions).token_losses.shape == (2, 4, 4)


def test_speed_options_are_checked():
    model = build_model(tiny_model("gemma3"), CoprocessorConfig(**CFG))
    with pytest.raises(ValueError, match="compile_step must be one of"):
        apply_speed_options(model, compile_step="fast")
    with pytest.raises(ValueError, match="use one of them"):
        apply_speed_options(model, compile_mlp=True, compile_step="step")
    from cacheaug.speed import parse_variant

    v = parse_variant("flex+masks+graphs+keeplogits")
    assert (v["attn"], v["compile_masks"], v["compile_step"], v["keep_logits"], v["compile_mlp"]) == (
        "flex_attention",
        True,
        "graphs",
        True,
        False,
    )
    assert parse_variant("sdpa+graphs+g2+keeplogits")["trace_groups"] == 2
    assert parse_variant("sdpa")["trace_groups"] == 1
    for bad in ("sdpa+step+graphs", "sdpa+mlp+step", "fast", "sdpa+bogus", "sdpa+g2+g4", "sdpa+g0", "sdpa+gx"):
        with pytest.raises(ValueError, match="bad variant"):
            parse_variant(bad)


@pytest.mark.slow  # slow tier: torch.compile
def test_training_with_the_compiled_step_follows_the_eager_run(tmp_path, monkeypatch):
    """The trainer path (gradient accumulation, eager evaluation under no_grad, checkpoints) with compile_step."""
    import json

    from cacheaug.testing import tiny_corpus, tiny_tokenizer
    from cacheaug.train import TrainConfig, train

    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer(tiny_corpus(tmp_path / "corpus", n_docs=60))
    small = dict(
        data=(str(tmp_path / "corpus"),),
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        n_latents=2,
        n_ahead=3,
        n_traces=4,
        max_steps=3,
        warmup_steps=1,
        eval_every=0,
        eval_sequences=2,
        log_every=1,
        save_every=0,
        heldout_pct=20.0,
    )
    logs = {}
    for mode in ("off", "step"):
        torch._dynamo.reset()
        out = tmp_path / mode
        cache = str(tmp_path / "compile_cache.bin") if mode == "step" else None
        train(
            TrainConfig.from_flat(**small, out_dir=str(out), compile_step=mode, compile_cache=cache),
            base=tiny_model("gemma3"),
            tokenizer=tok,
            progress=False,
        )
        logs[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logs[mode] if "first_step_s" in r] == [1]  # the compile's time, logged once
    # the compiled run's artifacts were written after its first step and load into a fresh process's caches
    from cacheaug.speed import load_compile_cache

    size = (tmp_path / "compile_cache.bin").stat().st_size
    assert size > 0 and load_compile_cache(tmp_path / "compile_cache.bin") == size
    assert load_compile_cache(tmp_path / "missing.bin") == 0
    loss = {m: [r["loss"] for r in rows if "loss" in r] for m, rows in logs.items()}
    assert len(loss["step"]) == 3
    assert max(abs(a - b) for a, b in zip(loss["off"], loss["step"])) < 1e-4, loss
    final_eval = {m: [r for r in rows if "eval_losses" in r][-1]["eval_losses"] for m, rows in logs.items()}
    assert max(abs(a - b) for a, b in zip(final_eval["off"], final_eval["step"])) < 1e-4


def test_keeping_the_loss_logits_changes_nothing_but_memory():
    model = build_model(tiny_model("gemma3"), CoprocessorConfig(**CFG))
    perturb_trainable(model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 9, 20, 35], [3, 4, 17, 30]])
    ref, g_ref = _losses_and_grads(model, ids, positions)
    model.recompute_loss = False
    kept, g_kept = _losses_and_grads(model, ids, positions)
    assert torch.equal(kept.token_losses, ref.token_losses)
    assert all(torch.allclose(g_kept[n], g_ref[n], rtol=1e-6, atol=1e-7) for n in g_ref)


def test_compile_artifacts_saved_compressed_load_back(tmp_path):
    """``--compile-cache FILE.xz`` writes the artifacts lzma-compressed (to carry them to another machine in one
    piece) and loads them back; a plain path stays uncompressed."""
    import lzma

    from cacheaug.speed import load_compile_cache, save_compile_cache

    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor")
    f(torch.randn(8))
    plain, packed = tmp_path / "cc.bin", tmp_path / "cc.bin.xz"
    assert save_compile_cache(plain) == plain.stat().st_size > 0
    assert save_compile_cache(packed) == packed.stat().st_size > 0
    assert lzma.decompress(packed.read_bytes()) == plain.read_bytes()
    assert load_compile_cache(packed) == packed.stat().st_size
    for bad in (b"not lzma", packed.read_bytes()[:100]):  # garbage, a truncated copy: only a cache, compiled afresh
        packed.write_bytes(bad)
        with pytest.warns(UserWarning, match="compiling afresh"):
            assert load_compile_cache(packed) == 0
    plain.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="compiling afresh"):
        assert load_compile_cache(plain) == 0
