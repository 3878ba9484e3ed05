"""Serving under pressure, over real HTTP with a tiny model: bursts at the default limits, clients that go away, a
hung coprocessor in the real order of timeouts, /v1/augment's deadline, per-request metrics, the store's disk
budget, and random request bodies (hypothesis) that must never get a 5xx."""

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import PROMPT, WORDS, Server

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.serving import CacheStore, Engine
from cacheaug.serving.server import create_app
from cacheaug.testing import perturb_trainable, tiny_model, tiny_tokenizer


def _stack(tmp_path, *, step_s: float = 0.0, engine_kwargs=None, **app_kwargs):
    model = CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(model, scale=1.0)
    if step_s:  # a slower decoder, so that requests overlap as they would on a real model
        forward = model.base.forward

        def slow(*args, **kwargs):
            time.sleep(step_s)
            return forward(*args, **kwargs)

        model.base.forward = slow
    tok = tiny_tokenizer([WORDS])
    engine = Engine(model, CacheStore(directory=tmp_path / "store", fingerprint="t"), **(engine_kwargs or {}))
    return model, engine, Server(create_app(engine, tok, **app_kwargs))


@pytest.fixture
def stacks():
    made = []
    yield made
    for _, engine, server in made:
        server.stop()
        engine.close()


def _wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_burst_at_the_default_limits_gets_only_200_and_429_in_bounded_time(tmp_path, stacks):
    """Issue: 24-40 concurrent requests at --max-concurrent 8 --max-queue 16 stalled (waiting requests filled the
    thread pool the running ones needed) and ended in 503s and client timeouts."""
    stacks.append(_stack(tmp_path, step_s=0.01))  # create_app's defaults: 8 decoding, 16 waiting
    server = stacks[-1][2]
    statuses, t0 = [], time.monotonic()

    def client():
        r = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 32, "augment": "sync"}, timeout=60
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(statuses) == 40 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 24  # everything admitted (8 decoding + 16 waiting) is answered
    assert time.monotonic() - t0 < 45


def test_a_client_that_goes_away_frees_its_slot(tmp_path, stacks):
    """Issue: a closed SSE stream or a timed-out client kept decoding all its tokens, holding its slot."""
    stacks.append(_stack(tmp_path, step_s=0.05, max_concurrent=1, max_queue=4))
    _, engine, server = stacks[-1]
    body = {"prompt": PROMPT, "max_tokens": 200, "augment": "off"}  # 200 steps: 10 s of decoding
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break  # the client closes the stream
    assert _wait_for(lambda: engine.stats.cancelled == 1, 5)
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 3  # the slot was free
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    assert _wait_for(lambda: engine.stats.cancelled == 2, 5)
    t0 = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 3
    assert 'status="cancelled"' in httpx.get(f"{server.url}/metrics").text


def test_hung_coprocessor_is_replaced_in_the_real_order_of_timeouts(tmp_path, stacks):
    """Issue: with the hard timeout (3 s) longer than the deadline (500 ms), nothing ever replaced a hung worker: each
    request paid its deadline and fell back, for ever."""
    stacks.append(_stack(tmp_path, engine_kwargs=dict(default_deadline_s=0.5, hard_timeout_s=1.5)))
    model, engine, server = stacks[-1]
    release, calls = threading.Event(), []
    compute = model.compute_latents

    def first_call_hangs(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release.wait(30)
        return compute(*args, **kwargs)

    model.compute_latents = first_call_hangs
    augmented, t_start = [], time.monotonic()
    with pytest.warns(UserWarning, match="worker was replaced"):
        while time.monotonic() - t_start < 10 and not any(augmented):
            t0 = time.monotonic()
            r = httpx.post(
                f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "augment": "sync"}, timeout=30
            ).json()
            assert time.monotonic() - t0 < 2.0  # never more than the deadline (plus decoding)
            augmented.append(r["augmentation"]["augmented"])
    assert augmented[0] is False and augmented[-1] is True  # replaced within the hard timeout, then working again
    assert engine.stats.worker_restarts == 1 and time.monotonic() - t_start < 5
    release.set()


def test_augment_endpoint_has_a_deadline_and_never_wedges_the_server(tmp_path, stacks):
    """Issue: /v1/augment with a hung coprocessor never returned and held the decoder, so even augment=off hung."""
    stacks.append(_stack(tmp_path, engine_kwargs=dict(hard_timeout_s=20)))
    model, engine, server = stacks[-1]
    hang = threading.Event()
    model.compute_latents = lambda *args, **kwargs: hang.wait(30)
    result = {}

    def augment():
        t0 = time.monotonic()
        result["r"] = httpx.post(
            f"{server.url}/v1/augment", json={"prompt": "w5 w17 w40", "deadline_ms": 800}, timeout=30
        )
        result["s"] = time.monotonic() - t0

    t = threading.Thread(target=augment)
    t.start()
    time.sleep(0.2)  # the augmentation is waiting for the coprocessor now
    t0 = time.monotonic()
    off = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "augment": "off"}, timeout=10
    )
    assert off.status_code == 200 and time.monotonic() - t0 < 2  # the decoder is not held
    t.join(10)
    assert result["r"].status_code == 503 and result["s"] < 3
    assert "deadline" in result["r"].json()["error"]["message"] and len(engine.store) == 0
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    hang.set()


def test_augmentation_metrics_count_each_request_once(tmp_path, stacks):
    """Issue: the outcome counters were diffs of engine-wide counters, so concurrent requests counted each other."""
    stacks.append(_stack(tmp_path, step_s=0.01, max_concurrent=8))
    _, engine, server = stacks[-1]

    def client(policy):
        httpx.post(
            f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "augment": policy}, timeout=60
        )

    threads = [threading.Thread(target=client, args=("sync" if i % 2 else "off",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'cacheaug_augmentations_total{outcome="augmented"} 6.0' in metrics
    assert engine.stats.requests == 12 and engine.stats.augmented == 6


def test_store_disk_budget_deletes_least_recently_used_files(tmp_path):
    model = CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=3, n_ahead=4))
    engine = Engine(model, CacheStore(directory=tmp_path, fingerprint="m"))
    one = engine.augment_prefix([5, 6, 7, 8])
    size = (tmp_path / f"{one}.safetensors").stat().st_size
    engine.close()
    store = CacheStore(directory=tmp_path, fingerprint="m", max_disk_bytes=3 * size)
    engine = Engine(model, store)
    ids = [engine.augment_prefix([5, 6, 7, 8 + i]) for i in range(1, 8)]
    engine.store.load(ids[-3], "cpu")  # used: it outlives the older ones
    ids.append(engine.augment_prefix([5, 6, 7, 99]))
    files = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and store.disk_bytes <= 3 * size
    assert set(files) == {ids[-4], ids[-2], ids[-1]} and len(store) == 3
    engine.close()
    assert len(CacheStore(directory=tmp_path, fingerprint="m", max_disk_bytes=size)) == 1  # trimmed at start too
    with pytest.raises(ValueError, match="budgets"):
        CacheStore(max_bytes=-1)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_FIELD = {
    "prompt": st.text(max_size=20) | _JSON,
    "max_tokens": st.integers(-3, 12) | _JSON,
    "temperature": st.floats() | _JSON,
    "top_p": st.floats() | _JSON,
    "seed": st.integers(-(2**70), 2**70) | _JSON,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | _JSON,
    "augment": st.sampled_from(["off", "sync", "async", "x"]) | _JSON,
    "deadline_ms": st.integers(-5, 700_000) | _JSON,
    "stream": st.booleans() | _JSON,
    "n": st.integers(0, 3) | _JSON,
    "logprobs": _JSON,
    "echo": _JSON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "bot"]), "content": st.text(max_size=12) | _JSON}
        ),
        max_size=2,
    )
    | _JSON,
    "unknown_field": _JSON,
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    _, engine, server = _stack(tmp_path_factory.mktemp("hyp"))
    yield server
    server.stop()
    engine.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/augment"]),
    body=st.fixed_dictionaries({}, optional=_FIELD) | _JSON,
)
def test_random_bodies_never_get_a_server_error(shared_server, endpoint, body):
    raw = json.dumps(body, allow_nan=True)  # NaN and Infinity too, as a careless client sends them
    r = httpx.post(
        f"{shared_server.url}{endpoint}", content=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and not r.headers.get("content-type", "").startswith("text/event-stream"):
        assert isinstance(r.json()["error"]["message"], str)  # one clear line, not a traceback
    assert httpx.get(f"{shared_server.url}/health").status_code == 200
