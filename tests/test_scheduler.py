"""The engine loop (cacheaug.serving.scheduler): one thread decodes every request; a request waiting for its latents or
for a slow reader never stalls the others; steps of concurrent requests run as one batch, exactly."""

import threading
import time

import pytest
import torch

from cacheaug.serving import Engine

PROMPT = [2, 17, 40, 9, 33, 81, 5, 66]


@pytest.fixture
def engine(model):
    e = Engine(model, default_deadline_s=10, max_batch=8)
    yield e
    e.close()


def _plain(model, prompt, n):
    return model.generate(torch.tensor([prompt]), n, augment=False, eos_token_id=[])[0, len(prompt) :].tolist()


def test_every_decoder_call_runs_on_the_engine_loop(model, engine):
    threads, real = set(), model.base.forward

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    model.base.forward = recording
    results = {}

    def client(i, policy):
        results[i] = engine.generate(PROMPT[: 4 + i], 6, policy=policy)[0]

    clients = [threading.Thread(target=client, args=(i, ("off", "sync", "async")[i % 3])) for i in range(6)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    assert len(results) == 6
    assert threads == {"cacheaug-engine-loop"}  # prefill, insertion, replay and every step: one owner


def test_a_request_waiting_for_its_latents_does_not_stall_another(model, engine):
    gate, real = threading.Event(), model.compute_latents

    def held(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    model.compute_latents = held
    info: dict = {}
    waiting = threading.Thread(target=lambda: engine.generate(PROMPT, 4, policy="sync", info=info))
    waiting.start()
    for _ in range(200):  # the sync request is parked, waiting for its latents
        if info.get("states", [])[-1:] == ["waiting_for_latents"]:
            break
        time.sleep(0.01)
    assert info["states"][-1] == "waiting_for_latents"
    t0 = time.monotonic()
    tokens, _ = engine.generate(PROMPT[:5], 12, policy="off")  # decodes meanwhile
    assert tokens == _plain(model, PROMPT[:5], 12) and time.monotonic() - t0 < 5
    assert info["states"][-1] == "waiting_for_latents" and waiting.is_alive()
    gate.set()
    waiting.join(10)
    assert info["outcome"] == "augmented" and info["states"][-1] == "done"


def test_a_slow_reader_holds_only_its_own_request(model, engine):
    slow = engine.stream(PROMPT, 20, policy="off")
    first = next(slow)  # then this reader pauses: its request waits for it, the loop goes on
    t0 = time.monotonic()
    tokens, _ = engine.generate(PROMPT[:6], 15, policy="off")
    assert tokens == _plain(model, PROMPT[:6], 15) and time.monotonic() - t0 < 5
    rest = [s.token for s in slow]
    assert [first.token] + rest == _plain(model, PROMPT, 20)


def test_a_reader_that_stops_frees_the_request_without_counting_a_cancel(model, engine):
    stream = engine.stream(PROMPT, 50, policy="off")
    next(stream)
    stream.close()  # the consumer stops reading
    for _ in range(100):
        if not engine.scheduler.active:
            break
        time.sleep(0.02)
    assert not engine.scheduler.active and engine.stats.cancelled == 0


def test_closing_the_engine_ends_open_streams_with_an_error(model):
    engine = Engine(model)
    stream = engine.stream(PROMPT, 50, policy="off")
    next(stream)
    engine.close()
    with pytest.raises(RuntimeError, match="engine was closed"):
        list(stream)
    with pytest.raises(RuntimeError, match="engine is closed"):
        next(engine.stream(PROMPT, 5, policy="off"))


def test_a_token_asked_for_while_the_loop_is_busy_is_not_missed(model, engine):
    """The reader's ask() can land after the loop found no demand and before its idle wait: the loop must not sleep
    through it (that lost wake-up cost a whole idle period per token). Forced here: every ask lands exactly then."""
    sched = engine.scheduler
    sched.idle_s = 2.0
    real_ask, real_iteration = sched.ask, sched._iteration
    sched.ask = lambda req: None  # the reader's own ask is replaced by one that lands at the worst moment:

    def iteration():
        progressed = real_iteration()
        for req in list(sched.active):
            if not progressed and req.phase == "after" and req.demand == 0:
                real_ask(req)  # after the loop saw no demand, before it decides whether to wait
        return progressed

    sched._iteration = iteration
    start = time.perf_counter()
    tokens = [s.token for s in engine.stream(PROMPT, 6, policy="off")]
    assert time.perf_counter() - start < 2.0  # five lost wake-ups would take 10 s
    assert tokens == _plain(engine.model, PROMPT, 6)
