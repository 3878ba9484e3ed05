"""Coprocessor graphs (serving): a prefix copied into bucket-sized buffers, the rest masked, gives the latents of
``compute_latents``; the engine with them answers as without. (The CUDA capture itself needs a GPU:
benchmarks/serve_latency.py --coprocessor-graphs; here the same buffers and masks run eagerly.)"""

import pytest
import torch
from transformers import DynamicCache

from cacheaug import CoprocessorConfig, build_model, kv
from cacheaug.serving.engine import Engine
from cacheaug.serving.latent_graphs import LatentGraphs
from cacheaug.testing import FAMILIES, attn_for, perturb_trainable, tiny_model

LEVERS = dict(position_scheme="overlap", reread_last=True, echo_residual=True, readout="pre_norm")
LENGTHS = [1, 5, 8, 9, 16, 17, 30, 40]  # around the tiny sliding window (8) and the bucket (16)


def _model(family="gemma3", attn="sdpa", **levers):
    model = build_model(tiny_model(family, attn), CoprocessorConfig(n_latents=3, n_ahead=5, n_traces=4, **levers))
    perturb_trainable(model)
    return model.eval()


def _prefix(model, T=40, seed=0):
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    with torch.no_grad():
        model.base(ids, use_cache=True, **{model.family.cache_kwarg: cache})
    return ids, cache


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["default", "levers"])
def test_bucketed_call_equals_compute_latents(family, levers):
    attn = attn_for(family) if attn_for(family) in ("sdpa", "eager") else "eager"
    model = _model(family, attn, **levers)
    graphs = LatentGraphs(model, bucket=16, max_length=48)
    ids, cache = _prefix(model)
    for n in LENGTHS:
        with torch.no_grad():
            ref = model.compute_latents(cache, n, ids[:, n - 1])
        out = graphs(kv.layers(cache), n, int(ids[0, n - 1]))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{family} length {n}")
    assert sorted(graphs.buckets) == [16, 32, 48]  # one per bucket, reused within it
    # a longer prefix after a shorter one in the same bucket: the stale positions stay masked
    ids2, cache2 = _prefix(model, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            graphs(kv.layers(cache2), 12, int(ids2[0, 11])),
            model.compute_latents(cache2, 12, ids2[:, 11]),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.slow  # slow tier: torch.compile
def test_bad_calls_are_refused():
    model = _model(echo_residual=True)
    graphs = LatentGraphs(model, bucket=16, max_length=40)
    assert graphs.max_length == 48 and graphs.fits(48) and not graphs.fits(49)
    ids, cache = _prefix(model)
    with pytest.raises(ValueError, match="needs `last_token`"):
        graphs(kv.layers(cache), 10)
    with pytest.raises(ValueError, match="does not fit coprocessor graphs of at most 48"):
        graphs(kv.layers(cache), 49, 3)
    with pytest.raises(ValueError, match="bucket <= max_length"):
        LatentGraphs(model, bucket=64, max_length=32)
    flex = build_model(tiny_model("gemma3", "flex_attention"), CoprocessorConfig(n_latents=3, n_traces=4))
    with pytest.raises(ValueError, match="need sdpa or eager attention"):
        LatentGraphs(flex)


@pytest.mark.parametrize("policy", ["sync", "async"])
def test_engine_with_coprocessor_graphs_answers_as_without(policy):
    model = _model()
    prompt = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    answers, infos = [], []
    for graphs in (False, True):
        engine = Engine(model, default_deadline_s=30.0, async_grace_s=30.0, coprocessor_graphs=graphs)
        info = {}
        try:
            tokens = [step.token for step in engine.stream(prompt, 12, policy=policy, info=info)]
        finally:
            engine.close()
        answers.append(tokens)
        infos.append(info)
        assert engine.config.coprocessor_graphs is graphs
        assert (engine.worker.graphs is not None) is graphs
        if graphs:  # the call went through the bucketed path (a 20-token prompt: the 256-position bucket)
            assert sorted(engine.worker.graphs.buckets) == [256]
    assert answers[0] == answers[1] and infos[1]["outcome"] == "augmented"
