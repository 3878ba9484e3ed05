"""Static batched decoding (serving/slab.py) against the unbatched decoder, and through the engine."""

import pytest
import torch
from transformers import DynamicCache

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.families import FAMILIES
from cacheaug.serving import Engine
from cacheaug.serving.slab import Slab
from cacheaug.testing import generate_concurrently, tiny_model

CASES = [(f, a) for f in FAMILIES for a in ("sdpa", "eager") if a == "eager" or FAMILIES[f].sdpa_exact]


def _prefill(base, key, n, seed):
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    base(input_ids=ids, use_cache=True, **{key: cache})
    return cache


@pytest.mark.parametrize("family,attn", CASES)
def test_slab_steps_equal_unbatched_steps(family, attn):
    """Rows of different lengths (across the tiny sliding window of 8), stepping in subsets, with rotary positions that
    are not the cache index (as after latents), while the slab grows in rows and length: every step's logits equal
    the plain decoder's on the request's own cache."""
    model = CacheAugmentedLM(tiny_model(family, attn), CoprocessorConfig(n_latents=2))
    base, key = model.base, model.family.cache_kwarg
    slab = Slab(model, max_rows=8, max_length=256)
    refs, rows, shift = {}, {}, {}

    def admit(name, n, seed):
        refs[name] = _prefill(base, key, n, seed)
        copy = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in refs[name].layers])
        rows[name], shift[name] = slab.adopt(copy), seed % 3

    def step(names, seed):
        g = torch.Generator().manual_seed(seed)
        tokens = [int(t) for t in torch.randint(3, 128, (len(names),), generator=g)]
        positions = [refs[n].get_seq_length() - shift[n] for n in names]
        got = slab.step([rows[n] for n in names], tokens, positions)
        for i, (n, t, p) in enumerate(zip(names, tokens, positions)):
            want = base(
                input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[p]]), use_cache=True, **{key: refs[n]}
            ).logits[0, -1]
            assert torch.allclose(got[i], want, atol=1e-4), (family, attn, n, (got[i] - want).abs().max())

    admit("a", 5, 0)
    step(["a"], 1)
    admit("b", 13, 1)  # rows 1 -> 2
    admit("c", 30, 2)  # rows 2 -> 4
    for s in range(4):
        step(["a", "b", "c"] if s % 2 else ["c", "a"], 10 + s)  # rows not stepping keep what they hold
    admit("d", 70, 4)  # length 64 -> 128: the rows are copied into the larger slab
    assert slab.size == 128 and slab.rows == 4
    for s in range(3):
        step(["d", "b"] if s == 1 else ["a", "b", "c", "d"], 20 + s)
    slab.release(rows["b"])
    admit("e", 9, 5)  # the freed row is reused
    assert rows["e"] == rows["b"]
    step(["e", "c"], 30)
    for name in ("a", "c", "d", "e"):  # the row holds exactly the request's cache
        view, ref = slab.view(rows[name]), refs[name]
        assert view.get_seq_length() == ref.get_seq_length()
        for (k, v), layer in zip([(la.keys, la.values) for la in view.layers], ref.layers):
            assert torch.allclose(k, layer.keys, atol=1e-5) and torch.allclose(v, layer.values, atol=1e-5)


def test_slab_refuses_what_it_cannot_hold(model):
    slab = Slab(model, max_rows=1, max_length=64)
    cache = _prefill(model.base, model.family.cache_kwarg, 70, 0)
    with pytest.raises(ValueError, match="does not fit"):
        slab.adopt(cache)
    slab.adopt(_prefill(model.base, model.family.cache_kwarg, 5, 0))
    assert not slab.has_room()
    with pytest.raises(RuntimeError, match="every row"):
        slab.adopt(_prefill(model.base, model.family.cache_kwarg, 5, 1))


@pytest.mark.parametrize("policy", ["off", "sync", "async"])
def test_engine_static_and_dynamic_paths_agree(model, policy):
    """Concurrent requests through the slab equal the library's own generation; one request too long for the slab
    (static_max_len) takes the dynamic path beside them; every row is free again afterwards."""
    engine = Engine(model, async_grace_s=5.0, max_batch=4, static_max_len=64)
    prompts = [[2 + (7 * i + j) % 120 for j in range(4 + 3 * i)] for i in range(5)] + [list(range(3, 60))]
    expected = [
        model.generate(torch.tensor([p]), 8, augment=policy != "off", eos_token_id=[])[0, len(p) :].tolist()
        for p in prompts
    ]
    results = generate_concurrently(engine, prompts, 8, policy=policy)
    assert results == expected
    assert engine.slab.steps > 0
    assert sorted(engine.slab.free) == list(range(engine.slab.rows))
    engine.close()


def test_rows_grow_while_decoding():
    """A row that fills up grows the slab (its graphs are recorded again) and decoding goes on exactly."""
    model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2))
    base, key = model.base, model.family.cache_kwarg
    ref = _prefill(base, key, 60, 0)
    slab = Slab(model, max_rows=2, max_length=256)
    row = slab.adopt(DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in ref.layers]))
    assert slab.size == 64
    for token in range(3, 13):
        n = ref.get_seq_length()
        got = slab.step([row], [token], [n])[0]
        want = base(
            input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[n]]), use_cache=True, **{key: ref}
        ).logits[0, -1]
        assert torch.allclose(got, want, atol=1e-4)
    assert slab.size == 128 and slab.length[row] == 70
    assert Slab(model, max_rows=1, max_length=256).adopt(ref, reserve=200) == 0  # room reserved up front
    with pytest.raises(RuntimeError, match="full"):
        small = Slab(model, max_rows=1, max_length=72)
        r = small.adopt(ref)
        for token in range(3, 10):
            small.step([r], [token], [small.length[r]])


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_step_equals_the_eager_step():
    """The step traced by torch.compile (aot_eager on the CPU; inductor on a GPU) with the slab's cache object: the
    same logits as the eager step, one graph per step shape."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2))
        base, key = model.base, model.family.cache_kwarg
        caches = [_prefill(base, key, n, n) for n in (5, 20)]
        eager, compiled = Slab(model, 2, 256), Slab(model, 2, 256, compile="aot_eager")
        rows = [(eager.adopt(c), compiled.adopt(c)) for c in caches]
        for token in range(3, 8):
            want = eager.step([r for r, _ in rows], [token, token + 1], [eager.length[r] for r, _ in rows])
            got = compiled.step([r for _, r in rows], [token, token + 1], [compiled.length[r] for _, r in rows])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one shape: one graph, compiled once
        assert not torch._dynamo.utils.counters["graph_break"]
    finally:
        torch._dynamo.reset()


@pytest.mark.slow  # slow tier: torch.compile
def test_compiled_step_compiles_a_bounded_number_of_times():
    """Serving meets many step shapes (rows and keys, powers of two, as requests come and go and rows grow): the
    compiled step traces sizes symbolically, so new shapes reuse it (a real model's compile takes tens of seconds and
    holds every request meanwhile). At most four graphs (one row or more; keys the slab's whole length or fewer)
    however many shapes, each step equal to the eager one."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        model = CacheAugmentedLM(tiny_model("gemma3"), CoprocessorConfig(n_latents=2))
        base, key = model.base, model.family.cache_kwarg
        caches = [_prefill(base, key, 5 + 7 * i, i) for i in range(6)]
        eager, compiled = Slab(model, 8, 512), Slab(model, 8, 512, compile="aot_eager")
        rows = [(eager.adopt(c), compiled.adopt(c)) for c in caches]
        shapes = set()
        subsets = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3, 4], [2, 5], [0, 1, 2, 3, 4, 5]]
        for step in range(150):  # rows 1..8 and keys 64..256 (the slab grows twice)
            sub = subsets[step % len(subsets)] if step < 24 else ([0, 1, 2] if step % 3 else [0])
            token = 3 + step % 90
            want = eager.step([rows[i][0] for i in sub], [token] * len(sub), [eager.length[rows[i][0]] for i in sub])
            got = compiled.step(
                [rows[i][1] for i in sub], [token] * len(sub), [compiled.length[rows[i][1]] for i in sub]
            )
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            shapes.add((min(compiled.rows, 1 << max(sub).bit_length()), compiled.size))
        assert compiled.size >= 256 and len(shapes) >= 8
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
        assert not torch._dynamo.utils.counters["graph_break"]
    finally:
        torch._dynamo.reset()
