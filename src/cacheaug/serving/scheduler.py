"""The engine loop: one thread owns every active request and runs their decoding steps as one batch.

A request (:class:`~cacheaug.serving.request.Request`) is added by :meth:`Engine.stream` and then advanced only by
this loop, phase by phase: prefill (and the policy's ``after_prefill``), ``before_token``, choosing the token (one per
token the consumer asked for: a slow reader holds its request, never the others), ``after_token``, then the decoding
step, batched with every other request that needs one (:func:`~cacheaug.serving.batching.batched_step`, up to
``max_batch`` rows). A request waiting for its latents (``wait_and_insert``) waits without blocking anyone: the
loop looks again when the coprocessor answers or the wait ends, calls ``after_wait`` and goes on. Latents that
arrived (``insert_if_ready``) go in before the request's next token: after each pass over the requests, those of
all requests that decoded as many tokens in one decoder call (``Engine.insert_pending``, up to ``max_batch`` rows).
A cancelled request (its ``cancel`` event, or a consumer that stopped reading) leaves at the next iteration.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from .request import Step

END = object()  # put after a request's last token


class Scheduler:
    """The loop of an :class:`~cacheaug.serving.engine.Engine` (started at construction, stopped by ``close``).

    It decides; the ``runner`` (:class:`~cacheaug.serving.runner.Runner`) runs the decoding steps. What it asks of
    ``engine``: ``clock``, ``prefill``, ``can_augment``, ``choose``, ``insert_if_ready``, ``insert_pending``,
    ``give_up`` and ``stats``; the requests' policies get the engine too. Tests drive it with a fake engine and
    runner, no model (tests/test_scheduler_model_free.py)."""

    def __init__(self, engine, runner, max_batch: int = 16, idle_s: float = 0.05):
        self.engine, self.runner, self.max_batch, self.idle_s = engine, runner, max(1, max_batch), idle_s
        self.inbox: deque = deque()
        self.active: list = []
        self.cv = threading.Condition()
        self.batches = 0  # decoding steps run, and the rows they held
        self.rows = 0
        self._signals = 0  # add / ask / wake so far: the loop sleeps only if none came since its iteration began
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="cacheaug-engine-loop")
        self._thread.start()

    # ----------------------------------------------------------------------------------------- consumer side
    def add(self, req) -> None:
        with self.cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.inbox.append(req)
            self._signal()

    def ask(self, req) -> None:
        """The consumer wants ``req``'s next token."""
        with self.cv:
            req.demand += 1
            self._signal()

    def wake(self, *_) -> None:
        with self.cv:
            self._signal()

    def _signal(self) -> None:  # with self.cv held
        self._signals += 1
        self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self._closed = True
            self.cv.notify()
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def _run(self) -> None:
        while True:
            with self.cv:
                if self._closed:
                    break
                while self.inbox:
                    self.active.append(self.inbox.popleft())
                seen = self._signals
            progressed = self._iteration()
            if not progressed:
                with self.cv:  # a signal that came during the iteration (it may have missed it) means: go again
                    if not self._closed and not self.inbox and self._signals == seen:
                        self.cv.wait(timeout=self._idle_timeout())
        for req in self.active + list(self.inbox):  # consumers still reading learn of it
            if not req.finished:
                req.finished = True
                req.out.put(RuntimeError("the engine was closed"))

    def _idle_timeout(self) -> float:
        waits = [r.wait_until - self.engine.clock() for r in self.active if r.state == "waiting_for_latents"]
        return max(0.0, min([self.idle_s, *waits]))

    def _iteration(self) -> bool:
        progressed, stepping = False, []
        for req in list(self.active):
            moved, needs_step = self._guarded([req], self._advance, req) or (False, False)
            progressed |= moved
            if needs_step:
                stepping.append(req)
        for req in self._insert_ready():  # then on to their next token
            progressed = True
            moved, needs_step = self._guarded([req], self._advance, req) or (False, False)
            if needs_step:
                stepping.append(req)
        for i in range(0, len(stepping), self.max_batch):
            rows = stepping[i : i + self.max_batch]
            if not self._guarded(rows, self._step, rows):  # every request of the batch learns of a failure
                continue
            for req in rows:  # on to the next token, if it was asked for
                req.phase = "before"
                self._guarded([req], self._advance, req)
            progressed = True
        return progressed

    def _insert_ready(self) -> list:
        """Insert the arrived latents of the active requests, one decoder call per number of tokens decoded (up to
        ``max_batch`` rows each); returns the requests whose latents went in."""
        groups: dict[int, list] = {}
        for req in self.active:
            if req.latents is not None and not req.finished:
                groups.setdefault(req.n, []).append(req)
        done = []
        for group in groups.values():
            for i in range(0, len(group), self.max_batch):
                rows = group[i : i + self.max_batch]
                if self._guarded(rows, self.engine.insert_pending, rows):  # a failure fails these requests only
                    done += rows
        return done

    def _guarded(self, reqs, fn, *args):
        """``fn(*args)``, or None after finishing ``reqs`` with its error (they fail; the other requests go on)."""
        try:
            return fn(*args) or True
        except BaseException as err:  # noqa: BLE001
            for req in reqs:
                self._finish(req, err)
            return None

    def _advance(self, req) -> tuple[bool, bool]:
        """Run ``req``'s phases until it needs the consumer, its latents or a decoding step; returns (moved, needs a
        decoding step)."""
        engine, strategy, moved = self.engine, req.strategy, False
        while not req.finished:
            if req.abandoned or (req.cancel is not None and req.cancel.is_set()):
                self._finish(req, cancelled=True)
                return True, False
            if req.latents is not None:  # they go in with the other requests' (_insert_ready), then on
                return moved, False
            if req.state == "waiting_for_latents":
                if req.future is not None and not req.future.done() and engine.clock() < req.wait_until:
                    return moved, False
                engine.insert_if_ready(req)
                strategy.after_wait(engine, req)
                req.enter("decoding")
                moved = True
                continue
            if req.phase == "prefill":
                req.enter("prefilling")
                req.cache, req.logits, from_store = engine.prefill(req.prompt, strategy.augments)
                if from_store:
                    req.augmented, req.inserted_after = True, 0
                req.wants = engine.can_augment and not from_store
                req.phase = "before"
                strategy.after_prefill(engine, req)
                if req.state != "waiting_for_latents":
                    req.enter("decoding")
            elif req.phase == "before":
                req.phase = "choose"
                strategy.before_token(engine, req)
            elif req.phase == "choose":
                with self.cv:
                    if req.demand == 0:
                        return moved, False
                    req.demand -= 1
                if req.choice is not None and req.choice[1] is req.logits:  # computed with the batch's step
                    token = req.choice[0]
                else:
                    token = engine.choose(req.logits, req.temperature, req.top_p, req.generator)
                req.choice = None
                req.generated.append(token)
                req.out.put(Step(token, req.augmented, req.inserted_after))
                if token in req.stop_ids or req.n == req.max_new_tokens:
                    self._finish(req)
                    return True, False
                req.phase = "after"
            elif req.phase == "after":
                if req.demand == 0:  # the consumer has not asked for the next token yet
                    return moved, False
                req.phase = "step"
                strategy.after_token(engine, req)
            elif req.phase == "step":
                return moved, True
            moved = True
        return moved, False

    def _step(self, rows) -> None:
        """One decoding step of ``rows``, batched, by the runner (the model side)."""
        self.runner.step(rows)
        self.batches += 1
        self.rows += len(rows)

    def _finish(self, req, error: BaseException | None = None, cancelled: bool = False) -> None:
        if req.finished:
            return
        req.finished = True
        self.runner.release(req)  # its row (if it held one) is free for the next request
        if req in self.active:
            self.active.remove(req)
        if cancelled and not req.abandoned:  # the client went away (a consumer that stopped reading is not counted)
            req.info["cancelled"] = True
            self.engine.stats.add(cancelled=1)
        if req.future is not None:
            if cancelled or error is not None:
                req.future.cancel()  # skipped by the worker if still queued
                req.future = None
            else:  # never arrived in time
                self.engine.give_up(req)
        req.enter("cancelled" if cancelled else "done")
        req.out.put(END if error is None else error)
