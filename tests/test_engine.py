"""The serving engine: policies, deadlines, faults and the prefix store (no HTTP here)."""

import threading
import time

import pytest
import torch

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.serving import CacheStore, Engine
from cacheaug.testing import generate_concurrently, perturb_trainable, tiny_model

PROMPT = [2, 17, 40, 9, 33, 81, 5, 66]


@pytest.fixture(autouse=True)
def close_engines(monkeypatch):
    """Stop every engine's threads after each test (threads left inside torch abort the interpreter at exit)."""
    created = []
    init = Engine.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(Engine, "__init__", tracking_init)
    yield
    for engine in created:
        engine.close()


def _expected(model, augment):
    ids = torch.tensor([PROMPT])
    return model.generate(ids, 10, augment=augment, eos_token_id=[])[0, len(PROMPT) :].tolist()


def test_policies_match_the_library(model):
    engine = Engine(model, async_grace_s=5.0)
    assert engine.generate(PROMPT, 10, policy="off")[0] == _expected(model, False)
    tokens, info = engine.generate(PROMPT, 10, policy="sync")
    assert tokens == _expected(model, True) and info == {"augmented": True, "inserted_after": 0}
    tokens, info = engine.generate(PROMPT, 10, policy="async")  # latents arrive before the first token
    assert tokens == _expected(model, True) and info["inserted_after"] == 0
    assert _expected(model, True) != _expected(model, False)


def _async_with_latents_after(model, engine, n_tokens: int, ready_after: int = 3, info: dict | None = None) -> list:
    """Stream an async request whose coprocessor is held back until ``ready_after`` tokens are out."""
    release, done, real = threading.Event(), threading.Event(), model.compute_latents

    def slow(cache, length=None, last_token=None):
        release.wait(5)
        out = real(cache, length, last_token)
        done.set()
        return out

    model.compute_latents = slow
    steps = []
    for step in engine.stream(PROMPT, n_tokens, policy="async", info=info):
        steps.append(step)
        if len(steps) == ready_after:
            release.set()
            done.wait(5)
            time.sleep(0.2)  # the latents arrive between tokens ready_after and ready_after + 1
    return steps


def test_async_late_latents_go_in_at_their_place_and_the_tokens_are_replayed(model):
    engine = Engine(model, default_deadline_s=10, max_batch=1)
    info: dict = {}
    steps = _async_with_latents_after(model, engine, 10, info=info)
    generated = [s.token for s in steps]
    assert not steps[0].augmented and steps[-1].augmented and steps[-1].inserted_after == 3
    # the insertion's time on the loop's thread, reported with the request (the serving benchmark's insert_s)
    assert info["outcome"] == "augmented" and 0 < info["insert_s"] < info["latents_s"] + 5
    assert generated[:3] == _expected(model, False)[:3]  # chosen before the latents existed
    # from then on exactly a sync request that produced the same first 3 tokens: augment the prompt, then the
    # 3 tokens through the decoder, then greedy decoding
    aug = model.augment(torch.tensor([PROMPT]))
    logits = model.base(input_ids=torch.tensor([generated[:3]]), **model.cache_kwargs(aug.cache)).logits[:, -1]
    expected = []
    for _ in range(7):
        expected.append(int(logits.argmax(-1)))
        logits = model.base(input_ids=torch.tensor([[expected[-1]]]), **model.cache_kwargs(aug.cache)).logits[:, -1]
    assert generated[3:] == expected
    assert engine.stats.augmented == 1 and engine.stats.fallbacks == 0
    # decoded in the engine's slab; the replayed cache was copied into the request's row before the next step
    assert engine.slab.steps == 9 and engine.slab.adopted == 2
    engine.close()


def test_async_first_token_never_waits_and_too_late_latents_are_dropped(model):
    engine = Engine(model, default_deadline_s=10, max_stale_tokens=1)
    steps = _async_with_latents_after(model, engine, 8)  # ready after 3 tokens: past max_stale_tokens=1
    assert not any(s.augmented for s in steps)
    assert [s.token for s in steps] == _expected(model, False)[: len(steps)]
    assert engine.stats.fallbacks == 1 and engine.stats.augmented == 0
    engine.close()
    with pytest.raises(ValueError, match="max_stale_tokens"):
        Engine(model, max_stale_tokens=-1)
    with pytest.raises(ValueError, match="coprocessor_priority must be one of normal, high"):
        Engine(model, coprocessor_priority="urgent")


@pytest.mark.parametrize("error", [RuntimeError("coprocessor died"), SystemExit("coprocessor process killed")])
def test_raising_or_killed_coprocessor_falls_back(model, error):
    def fail(cache, length=None, last_token=None):
        raise error

    model.compute_latents = fail
    engine = Engine(model)
    with pytest.warns(UserWarning, match=type(error).__name__):
        assert engine.generate(PROMPT, 10, policy="sync")[0] == _expected(model, False)
    assert engine.stats.failed == 1 and engine.stats.fallbacks == 1


def test_hung_coprocessor_is_abandoned_within_the_deadline(model):
    hang = threading.Event()
    model.compute_latents = lambda cache, length=None, last_token=None: hang.wait(30)
    engine = Engine(model, hard_timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="worker was replaced"):
        tokens, info = engine.generate(PROMPT, 10, policy="sync", deadline_s=0.3)
    assert tokens == _expected(model, False) and not info["augmented"] and time.monotonic() - t0 < 3
    assert engine.stats.worker_restarts == 1 and engine.stats.late == 1
    del model.compute_latents  # the coprocessor works again; the hung call still occupies the old worker
    tokens, info = engine.generate(PROMPT, 10, policy="sync")
    assert info["augmented"] and tokens == _expected(model, True)
    hang.set()


def test_cancelled_coprocessor_job_falls_back(model):
    hang = threading.Event()
    model.compute_latents = lambda cache, length=None, last_token=None: hang.wait(20)
    engine = Engine(model, default_deadline_s=5)
    blocker = engine.submit_latents(engine.prefill(PROMPT)[0], len(PROMPT), PROMPT[-1])  # occupies the single worker
    deadline = time.monotonic() + 5
    while not blocker.running() and time.monotonic() < deadline:  # the worker took it: only the request's job queues
        time.sleep(0.01)
    assert blocker.running()
    steps = engine.stream(PROMPT, 10, policy="sync")

    def cancel_queued():  # as soon as the request's job is queued behind the blocker (however slow its prefill)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            if not engine.worker.queue.empty():
                engine.worker.queue.get_nowait()[-1].cancel()
                return
            time.sleep(0.01)

    threading.Thread(target=cancel_queued, daemon=True).start()
    with pytest.warns(UserWarning, match="CancelledError"):
        tokens = [s.token for s in steps]
    assert tokens == _expected(model, False)
    hang.set()
    blocker.result(5)


def test_stored_prefix_is_reused_without_the_coprocessor(model, tmp_path):
    engine = Engine(model, CacheStore(directory=tmp_path, fingerprint="m"))
    doc = PROMPT[:6]
    cache_id = engine.augment_prefix(doc)
    calls = {"n": 0}
    real = model.compute_latents

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    model.compute_latents = counted
    tokens, info = engine.generate(doc + PROMPT[6:], 6, policy="sync")
    assert calls["n"] == 0 and info["augmented"] and engine.stats.store_hits == 1
    # the same as augmenting the document, then reading the rest of the prompt
    aug = model.augment(torch.tensor([doc]))
    logits = model.base(input_ids=torch.tensor([PROMPT[6:]]), **model.cache_kwargs(aug.cache)).logits[:, -1]
    assert tokens[0] == int(logits.argmax(-1))
    # persisted: a new store over the same folder finds it
    again = CacheStore(directory=tmp_path, fingerprint="m")
    assert cache_id in again and again.longest_prefix(doc + [1, 2]) == cache_id
    assert CacheStore(directory=tmp_path, fingerprint="other").longest_prefix(doc) is None


def test_bad_store_files_are_skipped_and_bad_entries_recomputed(model, tmp_path):
    """Truncated, empty, garbage files, a folder named like an entry, wrong metadata: the store still opens; an entry
    with the right fingerprint but wrong shapes or NaN is discarded and the prompt computed afresh, exactly."""
    from safetensors.torch import save_file

    good = Engine(model, CacheStore(directory=tmp_path, fingerprint="m"))
    doc = PROMPT[:6]
    cache_id = good.augment_prefix(doc)
    blob = (tmp_path / f"{cache_id}.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all" * 10)
    (tmp_path / "folder.safetensors").mkdir()
    save_file(
        {"x": torch.zeros(1)}, str(tmp_path / "meta.safetensors"), metadata={"n_tokens": "many", "fingerprint": "m"}
    )
    with pytest.warns(UserWarning, match="skipping unreadable"):
        store = CacheStore(directory=tmp_path, fingerprint="m")
    assert cache_id in store and len(store) == 1
    expected = Engine(model, CacheStore()).generate(doc + PROMPT[6:], 5, policy="sync")[0]
    for corrupt in ("shape", "nan"):
        tensors = {"logits": torch.zeros(1, 8)}
        for i in range(model.base.config.num_hidden_layers):
            k = torch.zeros(1, 2, 3 if corrupt == "shape" else len(doc) + 3, 8)
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k, (k * float("nan") if corrupt == "nan" else k.clone())
        save_file(
            tensors, str(tmp_path / f"{cache_id}.safetensors"), metadata={"n_tokens": str(len(doc)), "fingerprint": "m"}
        )
        engine = Engine(model, CacheStore(directory=tmp_path, fingerprint="m"))
        with pytest.warns(UserWarning, match="discarding entry"):
            tokens, _ = engine.generate(doc + PROMPT[6:], 5, policy="sync")
        assert tokens == expected and engine.stats.store_hits == 0
        assert cache_id not in engine.store and not (tmp_path / f"{cache_id}.safetensors").exists()


@pytest.mark.parametrize("policy", ["sync", "async"])
def test_non_finite_latents_are_never_used(model, policy):
    engine = Engine(model, default_deadline_s=10, async_grace_s=5.0)
    with torch.no_grad():
        model.coprocessor.latent_scale.fill_(float("nan"))
    info: dict = {}
    with pytest.warns(UserWarning, match="non-finite latents"):
        tokens, summary = engine.generate(PROMPT, 6, policy=policy, info=info)
    assert tokens == _expected(model, False)[:6]  # the frozen model's answer, exactly
    assert not summary["augmented"] and info["outcome"] == "failed" and engine.stats.failed == 1


def test_non_finite_latents_are_never_stored(model, tmp_path):
    engine = Engine(model, CacheStore(directory=tmp_path, fingerprint="m"))
    with torch.no_grad():
        model.coprocessor.latent_scale.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.augment_prefix(PROMPT[:6])
    assert len(engine.store) == 0 and not list(tmp_path.glob("*.safetensors"))


def test_memory_budget_evicts_least_recently_used(model):
    store = CacheStore(max_bytes=1)  # everything but the newest entry is evicted
    engine = Engine(model, store)
    a = engine.augment_prefix(PROMPT[:4])
    b = engine.augment_prefix(PROMPT[:5])
    assert b in store and a not in store and store.evictions == 1


def test_batched_steps_equal_single_steps():
    from transformers import DynamicCache

    from cacheaug.families import cache_kwarg
    from cacheaug.serving.batching import batched_step

    for family in ("gemma3", "qwen2", "llama"):  # sliding windows of 8 against caches of 5..13 tokens
        base = tiny_model(family)
        key = cache_kwarg(base)
        caches, tokens, singles = [], [], []
        for i, n in enumerate((5, 13, 9)):
            ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(i))
            c = DynamicCache()
            base(input_ids=ids, use_cache=True, **{key: c})
            caches.append(c)
            tokens.append(int(ids[0, -1]) % 50 + 3)
        for c, t in zip(caches, tokens):
            copy = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in c.layers])
            singles.append(base(input_ids=torch.tensor([[t]]), use_cache=True, **{key: copy}).logits[0, -1])
        new, logits = batched_step(base, key, caches, tokens)
        assert torch.allclose(logits, torch.stack(singles), atol=1e-5), family
        assert [c.get_seq_length() for c in new] == [6, 14, 10]


def test_concurrent_requests_are_batched_and_exact(model):
    engine = Engine(model, async_grace_s=5.0, max_batch=8)
    prompts = [PROMPT[: 4 + i] for i in range(5)]
    expected = [
        model.generate(torch.tensor([p]), 8, augment=True, eos_token_id=[])[0, len(p) :].tolist() for p in prompts
    ]
    results = generate_concurrently(engine, prompts, 8, policy="sync")
    assert results == expected
    assert engine.scheduler.rows > engine.scheduler.batches  # some steps really ran together
    engine.close()


def test_concurrent_prefixes_run_through_the_coprocessor_as_one_batch(model):
    from transformers import DynamicCache

    for family, levers in (("gemma3", {}), ("qwen2", {}), ("gemma3", {"echo_residual": True})):
        m = CacheAugmentedLM(tiny_model(family), CoprocessorConfig(n_latents=3, n_ahead=4, **levers))
        perturb_trainable(m, scale=1.0)
        kvs, lengths, lasts, singles = [], [], [], []
        for i, n in enumerate((4, 12, 9)):
            cache = DynamicCache()
            ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(i))
            m.base.get_decoder()(input_ids=ids, **m.cache_kwargs(cache))
            kvs.append([(layer.keys, layer.values) for layer in cache.layers])
            lengths.append(n)
            lasts.append(int(ids[0, -1]))
            singles.append(m.compute_latents(cache, last_token=ids[:, -1]))
        for got, want in zip(m.compute_latents_batch(kvs, lengths, lasts), singles):
            assert torch.allclose(got, want, atol=1e-5), family

    # through the engine: requests submitted while the worker is busy are batched, and stay exact
    engine = Engine(model, async_grace_s=10.0, max_batch=8)
    gate = threading.Event()
    real = model.coprocessor.forward

    def gated(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    model.coprocessor.forward = gated
    prompts = [PROMPT[: 4 + i] for i in range(4)]
    results = [None] * 4
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], 6, policy="sync", deadline_s=10)[0])
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    gate.set()
    for t in threads:
        t.join(60)
    del model.coprocessor.forward
    expected = [model.generate(torch.tensor([p]), 6, eos_token_id=[])[0, len(p) :].tolist() for p in prompts]
    assert results == expected
    assert engine.worker.rows > engine.worker.batches  # the queued prefixes went through together
    engine.close()


BLOCKER = [3, 3, 3]


def _hold_the_loop(engine, monkeypatch):
    """Hold the engine loop inside a request's prefill until the returned event is set: whatever arrives meanwhile,
    the loop's next pass finds all at once."""
    held, release, prefill = threading.Event(), threading.Event(), engine.prefill

    def holding(prompt, use_store=True):
        if prompt == BLOCKER:
            held.set()
            release.wait(10)
        return prefill(prompt, use_store)

    monkeypatch.setattr(engine, "prefill", holding)
    thread = threading.Thread(target=lambda: engine.generate(BLOCKER, 1, policy="off"))
    thread.start()
    assert held.wait(10)
    return release, thread


def _gate_the_coprocessor(model):
    gate, real = threading.Event(), model.coprocessor.forward

    def gated(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    model.coprocessor.forward = gated
    return gate


def _wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_latents_that_arrive_together_go_in_with_one_decoder_call(model, monkeypatch):
    engine = Engine(model, max_batch=8, default_deadline_s=30)
    gate = _gate_the_coprocessor(model)
    prompts = [PROMPT[: 4 + i] for i in range(4)]  # different lengths: the rows are left-padded
    infos, results = [{} for _ in prompts], [None] * 4
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], 6, policy="sync", info=infos[i])[0])
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    _wait_for(lambda: all("waiting_for_latents" in i.get("states", ()) for i in infos))
    release, blocker = _hold_the_loop(engine, monkeypatch)
    gate.set()
    _wait_for(engine.worker.idle)  # every request's latents are in while the loop is held
    release.set()
    for t in [*threads, blocker]:
        t.join(60)
    del model.coprocessor.forward
    expected = [
        model.generate(torch.tensor([p]), 6, augment=True, eos_token_id=[])[0, len(p) :].tolist() for p in prompts
    ]
    assert results == expected
    assert engine.stats.augmented == 4 and engine.stats.insert_calls == 1
    assert all(i["outcome"] == "augmented" and i["insert_rows"] == 4 and i["insert_s"] > 0 for i in infos)


def test_late_latents_of_several_requests_go_in_together_with_their_replays(model, monkeypatch):
    engine = Engine(model, max_batch=8, default_deadline_s=30)
    gate = _gate_the_coprocessor(model)
    prompts = [PROMPT[: 5 + i] for i in range(3)]
    infos = [{} for _ in prompts]
    streams = [engine.stream(p, 7, policy="async", info=info) for p, info in zip(prompts, infos)]
    steps = [[next(s), next(s)] for s in streams]  # two tokens each; the coprocessor calls wait at the gate
    release, blocker = _hold_the_loop(engine, monkeypatch)
    gate.set()
    _wait_for(engine.worker.idle)
    readers = [threading.Thread(target=lambda i=i: steps[i].extend(streams[i])) for i in range(3)]
    for t in readers:  # each asks for its third token while the loop is held: the loop decodes the second, then
        # finds the latents of all three
        t.start()
    time.sleep(0.3)
    release.set()
    for t in [*readers, blocker]:
        t.join(60)
    del model.coprocessor.forward
    assert engine.stats.augmented == 3 and engine.stats.insert_calls == 1  # the three replays in one call
    for prompt, got, info in zip(prompts, steps, infos):
        tokens = [s.token for s in got]
        plain = model.generate(torch.tensor([prompt]), 7, augment=False, eos_token_id=[])[0, len(prompt) :].tolist()
        assert tokens[:2] == plain[:2]  # chosen before the latents went in
        # in before the third token: the two tokens replayed after them
        assert not got[1].augmented and got[2].augmented and got[2].inserted_after == 2 and info["insert_rows"] == 3
        # then exactly a request that was augmented before decoding these two tokens
        aug = model.augment(torch.tensor([prompt]))
        pos = torch.arange(aug.next_position, aug.next_position + 2)[None]
        logits = model.base(
            input_ids=torch.tensor([tokens[:2]]), position_ids=pos, **model.cache_kwargs(aug.cache)
        ).logits[:, -1]
        for i, token in enumerate(tokens[2:]):
            assert token == int(logits.argmax(-1))
            pos = torch.tensor([[aug.next_position + 2 + i]])
            logits = model.base(
                input_ids=torch.tensor([[token]]), position_ids=pos, **model.cache_kwargs(aug.cache)
            ).logits[:, -1]


def test_the_coprocessor_stream_waits_for_the_submitted_cache(model, monkeypatch):
    """On a GPU the coprocessor runs on its own stream: it must wait for what the submitting thread queued on its
    stream (the forked cache's copy) before reading it. Recorded here with stand-ins for the stream and events."""
    from transformers import DynamicCache

    from cacheaug import kv
    from cacheaug.serving.batching import LatentsWorker

    log = []

    class Event:
        def record(self):
            log.append(("record", threading.current_thread().name, self))

    class Stream:
        def wait_event(self, event):
            log.append(("wait", threading.current_thread().name, event))

        def synchronize(self):
            log.append(("synchronize", threading.current_thread().name, None))

    real = model.compute_latents

    def computing(*args, **kwargs):
        log.append(("compute", threading.current_thread().name, None))
        return real(*args, **kwargs)

    monkeypatch.setattr(LatentsWorker, "stream_event", staticmethod(Event))
    model.compute_latents = computing
    worker = LatentsWorker(model, Stream())
    try:
        cache = DynamicCache()
        model.decode(cache, torch.tensor([PROMPT]), 0)
        latents = worker.submit(kv.layers(kv.fork(cache, len(PROMPT))), len(PROMPT), PROMPT[-1]).result(30)
    finally:
        worker.close()
    assert torch.isfinite(latents).all()
    (record, wait, compute, sync) = log
    assert record[:2] == ("record", threading.current_thread().name)  # on the submitting thread's stream
    assert wait[0] == "wait" and wait[2] is record[2] and wait[1] == "cacheaug-coprocessor"
    assert compute[0] == "compute" and sync[0] == "synchronize"  # the wait comes before the coprocessor reads


def test_a_coprocessor_call_says_where_its_time_went(model, monkeypatch):
    """Why a call is slow beside decoding (benchmarks/serve_latency.py): each call reports how long it waited for the
    worker thread, its host side (Python, kernel launches) and then its stream (the device). Stand-ins here: a host
    side of at least 50 ms and a stream that takes 100 ms more; through the engine, the request's own info."""
    from transformers import DynamicCache

    from cacheaug import kv
    from cacheaug.serving.batching import LatentsWorker

    class Event:
        def record(self):
            pass

    class Stream:
        def wait_event(self, event):
            pass

        def synchronize(self):
            time.sleep(0.1)

    real = model.compute_latents

    def slow_host(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(LatentsWorker, "stream_event", staticmethod(Event))
    monkeypatch.setattr(model, "compute_latents", slow_host)
    worker = LatentsWorker(model, Stream())
    try:
        cache = DynamicCache()
        model.decode(cache, torch.tensor([PROMPT]), 0)
        future = worker.submit(kv.layers(kv.fork(cache, len(PROMPT))), len(PROMPT), PROMPT[-1])
        future.result(30)
    finally:
        worker.close()
    timing = future.timing
    assert timing["rows"] == 1 and 0 <= timing["queued_s"] < 0.2  # the idle worker took it at once
    assert timing["launch_s"] >= 0.05 and timing["device_s"] >= 0.1  # host side, then the stream's wait
    monkeypatch.undo()
    engine = Engine(model)
    info = {}
    list(engine.stream(PROMPT, 3, policy="sync", info=info))
    engine.close()
    assert info["outcome"] == "augmented" and info["rows"] == 1
    assert 0 <= info["queued_s"] and 0 < info["launch_s"] and 0 <= info["device_s"]
    assert info["queued_s"] + info["launch_s"] + info["device_s"] <= info["latents_s"] + 1e-3


def test_engine_options_are_one_checked_config(model):
    """Issue 40: the engine takes one EngineConfig (keyword fields override it); bad values and unknown names are
    refused before anything is built, and `cacheaug serve` names its flags in the same check."""
    from cacheaug.serving import EngineConfig
    from cacheaug.serving.launch import serve

    base = EngineConfig(max_stale_tokens=3, default_deadline_s=0.5)
    engine = Engine(model, config=base, max_batch=2)
    try:
        assert engine.config == EngineConfig(max_stale_tokens=3, default_deadline_s=0.5, max_batch=2)
        assert base.max_batch == 16  # the caller's config is not changed
    finally:
        engine.close()
    with pytest.raises(ValueError, match="max_batch must be an integer of at least 1.*coprocessor_priority"):
        EngineConfig(max_batch=0, coprocessor_priority="urgent")
    with pytest.raises(TypeError, match="unknown options \\['max_stale'\\]"):
        Engine(model, max_stale=3)
    with pytest.raises(SystemExit, match="--hard-timeout-ms \\(hard_timeout_s\\) must be above 0"):
        serve(hard_timeout_ms=0)  # refused before any model is loaded
