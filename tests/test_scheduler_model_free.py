"""The engine loop's scheduler without a model: a fake engine and runner stand in for the decoder, so what is tested
is only what the scheduler decides: batches of at most ``max_batch`` rows, a slow reader holding only its own
request, cancellation freeing a row, a failure failing only its batch, a wait for latents blocking no one, and latents
that arrive together going in together."""

import concurrent.futures as cf
import threading
import time

import pytest

from cacheaug.serving.engine import Stats
from cacheaug.serving.policies import Policy
from cacheaug.serving.request import Request
from cacheaug.serving.scheduler import END, Scheduler


class FakeEngine:
    """The engine's side of the loop: a request with prompt ``[k]`` decodes the tokens 100k, 100k + 1, ..."""

    clock = staticmethod(time.monotonic)
    can_augment = True

    def __init__(self):
        self.stats, self.inserts, self.scheduler = Stats(), [], None

    def prefill(self, prompt, use_store=True):
        return object(), (prompt[0], 0), False  # a cache, the "logits" of token 0, not from the store

    @staticmethod
    def choose(logits, temperature, top_p, generator):
        return 100 * logits[0] + logits[1]

    def wait_and_insert(self, req, seconds):
        req.wait_until = self.clock() + seconds
        req.enter("waiting_for_latents")
        req.future.add_done_callback(self.scheduler.wake)

    def insert_if_ready(self, req):
        if req.future is not None and req.future.done():
            req.latents, req.future = req.future.result(), None

    def insert_pending(self, reqs):
        self.inserts.append([r.prompt[0] for r in reqs])
        for r in reqs:
            r.latents, r.augmented, r.inserted_after = None, True, r.n

    def give_up(self, req):
        req.future = None


class FakeRunner:
    """Decoding steps: each row's logits move on to its next token; ``fail_for`` prompts make the step raise."""

    def __init__(self, fail_for=()):
        self.sizes, self.released, self.fail_for = [], [], set(fail_for)

    def step(self, rows):
        self.sizes.append(len(rows))
        if any(r.prompt[0] in self.fail_for for r in rows):
            raise RuntimeError("device error")
        for r in rows:
            r.logits = (r.prompt[0], r.n)

    def release(self, req):
        self.released.append(req.prompt[0])


class WaitForLatents(Policy):
    """Submit at once (the test decides when the "coprocessor" answers) and wait for the latents before token 0."""

    name = "test-wait"

    def __init__(self, future):
        self.future = future

    def after_prefill(self, engine, req):
        req.future = self.future
        engine.wait_and_insert(req, 30.0)


@pytest.fixture
def loop():
    made = []

    def make(max_batch=16, runner=None):
        engine, runner = FakeEngine(), runner or FakeRunner()
        engine.scheduler = Scheduler(engine, runner, max_batch=max_batch)
        made.append(engine.scheduler)
        return engine, runner, engine.scheduler

    yield make
    for sched in made:
        sched.close()


def request(k, n_tokens, demand=None, policy=None):
    req = Request([k], deadline=time.monotonic() + 60, strategy=policy or Policy(), max_new_tokens=n_tokens)
    req.demand = n_tokens if demand is None else demand
    return req


def read(req, timeout=10.0):
    """The steps of ``req`` up to its end (END) or an error, as (token, augmented) pairs."""
    got = []
    while True:
        item = req.out.get(timeout=timeout)
        if item is END:
            return got
        if isinstance(item, BaseException):
            return got + [item]
        got.append((item.token, item.augmented))


def add_together(sched, reqs):
    """Hand ``reqs`` to the loop at once (it moves its inbox into the active list under the same lock)."""
    with sched.cv:
        sched.inbox.extend(reqs)
        sched._signal()


def test_requests_decode_in_batches_of_at_most_max_batch(loop):
    engine, runner, sched = loop(max_batch=2)
    reqs = [request(k, 3) for k in range(1, 6)]
    add_together(sched, reqs)
    for k, req in enumerate(reqs, 1):
        assert read(req) == [(100 * k + i, False) for i in range(3)]
    assert max(runner.sizes) == 2 and sum(runner.sizes) == 5 * 2  # two steps per request (token 0 is the prefill's)
    assert runner.sizes[:3] == [2, 2, 1]  # the five that asked together: in batches of two
    assert sched.batches == len(runner.sizes) and sched.rows == 10
    assert sorted(runner.released) == [1, 2, 3, 4, 5] and not sched.active


def test_a_slow_reader_holds_only_its_own_request(loop):
    engine, runner, sched = loop()
    slow, fast = request(1, 4, demand=1), request(2, 4)
    add_together(sched, [slow, fast])
    assert read(fast) == [(200 + i, False) for i in range(4)]
    assert slow.out.get(timeout=10).token == 100 and slow.out.empty()  # one token asked for, one given
    assert slow.state == "decoding" and not slow.finished
    for _ in range(3):  # the reader asks for the rest, one at a time
        sched.ask(slow)
    assert read(slow) == [(100 + i, False) for i in range(1, 4)]


def test_a_cancelled_request_leaves_and_frees_its_row(loop):
    engine, runner, sched = loop()
    cancel = threading.Event()
    req = request(1, 5, demand=1)
    req.cancel = cancel
    other = request(2, 2)
    add_together(sched, [req, other])
    assert req.out.get(timeout=10).token == 100
    cancel.set()
    sched.ask(req)
    assert read(req) == [] and req.state == "cancelled" and req.info["cancelled"]
    assert engine.stats.cancelled == 1 and 1 in runner.released
    assert read(other) == [(200, False), (201, False)]
    gone = request(3, 5, demand=1)  # a consumer that stopped reading is dropped, not counted as cancelled
    sched.add(gone)
    assert gone.out.get(timeout=10).token == 300
    gone.abandoned = True
    sched.wake()
    assert gone.out.get(timeout=10) is END and engine.stats.cancelled == 1


def test_a_failing_step_fails_only_its_batch(loop):
    engine, runner, sched = loop(max_batch=1, runner=FakeRunner(fail_for={2}))
    reqs = [request(k, 3) for k in (1, 2, 3)]
    add_together(sched, reqs)
    bad = read(reqs[1])
    assert bad[0] == (200, False) and isinstance(bad[-1], RuntimeError) and len(bad) == 2
    assert read(reqs[0]) == [(100, False), (101, False), (102, False)]
    assert read(reqs[2]) == [(300, False), (301, False), (302, False)]
    assert 2 in runner.released


def test_a_wait_for_latents_blocks_no_one_and_latents_arriving_together_go_in_together(loop):
    engine, runner, sched = loop()
    future = cf.Future()
    policy = WaitForLatents(future)
    waiting = [request(1, 3, policy=policy), request(2, 3, policy=policy)]
    plain = request(3, 3)
    add_together(sched, waiting + [plain])
    assert read(plain) == [(300, False), (301, False), (302, False)]  # decoded while the two wait
    assert all(r.state == "waiting_for_latents" and r.out.empty() for r in waiting)
    future.set_result("latents")  # the coprocessor answers both at once
    for k, req in zip((1, 2), waiting):
        assert read(req) == [(100 * k + i, True) for i in range(3)]  # augmented before their first token
        assert req.inserted_after == 0
    assert engine.inserts == [[1, 2]]  # one insertion call for both
