"""The public inference helpers: cache operations (cacheaug.kv) and the sampler (cacheaug.sampling)."""

import pytest
import torch
from transformers import DynamicCache

from cacheaug import kv
from cacheaug.families import cache_kwarg
from cacheaug.sampling import SamplingParams, next_token
from cacheaug.testing import tiny_model


def _cache(base, n, seed=0):
    cache = DynamicCache()
    base(
        input_ids=torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed)),
        use_cache=True,
        **{cache_kwarg(base): cache},
    )
    return cache


def test_fork_leaves_the_original_unchanged_and_decodes_like_it():
    base = tiny_model("llama")
    cache = _cache(base, 10)
    before = [k.clone() for k, _ in kv.layers(cache)]
    short = kv.fork(cache, 6)
    assert kv.length(short) == 6 and kv.length(cache) == 10
    token = torch.tensor([[7]])
    key = cache_kwarg(base)
    a = base(input_ids=token, use_cache=True, **{key: kv.fork(cache)}).logits
    b = base(input_ids=token, use_cache=True, **{key: kv.fork(cache)}).logits  # a second fork: the same answer
    assert torch.equal(a, b)
    assert all(torch.equal(k, k0) for (k, _), k0 in zip(kv.layers(cache), before))
    assert kv.length(cache) == 10


def test_left_pad_and_unpad_rows_round_trip():
    base = tiny_model("gemma3")
    caches = [_cache(base, n, seed=n) for n in (3, 8, 5)]
    lengths = [kv.length(c) for c in caches]
    padded, mask = kv.left_pad([kv.layers(c) for c in caches], lengths, extra=2)
    assert padded[0][0].shape[0] == 3 and padded[0][0].shape[2] == 8 and mask.shape == (3, 10)
    assert mask.sum(1).tolist() == [3 + 2, 8 + 2, 5 + 2]
    rows = kv.unpad_rows(kv.from_layers(padded), lengths)
    for row, c in zip(rows, caches):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv.layers(row), kv.layers(c)))
    wide = kv.expand(caches[0], 4)
    assert kv.layers(wide)[0][0].shape[0] == 4 and torch.equal(kv.layers(wide)[0][0][3], kv.layers(caches[0])[0][0][0])


def test_sampler():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_token(logits).tolist() == [1, 0]  # greedy by default
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingParams(temperature=1.0, top_k=1), g).tolist() == [1, 0]
    assert next_token(logits, SamplingParams(temperature=1.0, top_p=1e-6), g).tolist() == [1, 0]
    draws = {int(next_token(logits[:1], SamplingParams(temperature=5.0), g)) for _ in range(200)}
    assert draws == {0, 1, 2, 3}  # a high temperature reaches every token
    draws = {int(next_token(logits[:1], SamplingParams(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert draws == {1, 3}
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
