"""Batched decoding steps for concurrent requests whose caches have different lengths.

Each request keeps its own ``DynamicCache``. A decoding step of several requests left-pads their caches to a
common length, runs the frozen decoder once on one new token per row (explicit positions; a 2D attention
mask hides the padding), and splits the result back into one cache per request. Left padding keeps every
row's query-to-key distances, so sliding-window layers mask exactly as they do unbatched.

The engine loop (:mod:`~cacheaug.serving.scheduler`) runs the steps of its requests together with
:func:`batched_step`. :class:`LatentsWorker` is the coprocessor's thread: queued prefixes of concurrent requests
run through it as one batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
import warnings

import torch
from transformers import DynamicCache

from .. import kv


@torch.no_grad()
def batched_step(
    base, cache_kwarg: str, caches: list[DynamicCache], tokens: list[int], positions: list[int] | None = None
):
    """One decoding step for every (cache, token) pair, each token at its rotary position (default: its cache's
    length); returns (new caches, logits [B, V])."""
    lengths = [kv.length(c) for c in caches]
    padded, mask = kv.left_pad([kv.layers(c) for c in caches], lengths, 1)
    batch = kv.from_layers(padded)
    device = mask.device
    out = base(
        input_ids=torch.tensor(tokens, device=device)[:, None],
        position_ids=torch.tensor(lengths if positions is None else positions, device=device)[:, None],
        attention_mask=mask,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg: batch},
    )
    return kv.unpad_rows(batch, [n + 1 for n in lengths]), out.logits[:, -1]


class CoprocessorTimeout(TimeoutError):
    """A coprocessor call overran the hard timeout; its worker was replaced."""


class LatentsWorker:
    """The coprocessor's worker thread: takes the queued prefixes, runs them as one batch, fulfils the futures.

    A hung batch cannot block later requests: a watchdog thread fails a batch that has run longer than
    ``hard_timeout_s`` (its futures raise :class:`CoprocessorTimeout`) and :meth:`replace` starts a new thread on
    the same queue, whatever the requests are waiting for; the old thread exits once (if ever) its batch returns.
    A queued job whose future was cancelled is skipped.

    With a ``stream`` (a GPU), the coprocessor runs on it, after the work the submitting thread had queued on its
    own stream when it submitted (the prefix's cache, copied there): :meth:`submit` records an event on the caller's
    stream and the worker's stream waits for it. Without that wait the coprocessor could read a cache whose copy had
    not finished.

    With ``graphs`` (:class:`~cacheaug.serving.latent_graphs.LatentGraphs`) a single prefix that fits runs as one
    CUDA graph replay: a few Python operations instead of hundreds of kernel launches, each waiting for the
    interpreter while the engine loop runs.

    A fulfilled future carries ``timing``: ``queued_s`` (submitted until this thread took it), ``launch_s`` (the
    call's host side: Python and kernel launches), ``device_s`` (then until its stream finished) and ``rows``.
    """

    def __init__(
        self, model, stream=None, max_batch: int = 16, hard_timeout_s: float | None = None, on_restart=None, graphs=None
    ):
        self.model, self.stream, self.max_batch = model, stream, max_batch
        self.graphs = graphs  # a LatentGraphs: one prefix at a time as one CUDA graph replay (latent_graphs.py)
        self.hard_timeout_s, self.on_restart = hard_timeout_s, on_restart
        self.queue: queue.Queue = queue.Queue()
        self.generation = 0
        self.batches = 0
        self.rows = 0
        self.restarts = 0
        self._running: dict[int, tuple[float, list]] = {}  # generation -> (start, futures) of the batch it runs
        self._state = threading.Lock()
        self._outstanding = 0  # submitted and not yet ended or skipped
        self.replace()
        if hard_timeout_s is not None:
            threading.Thread(target=self._watch, daemon=True, name="cacheaug-coprocessor-watchdog").start()

    def _watch(self) -> None:
        period = min(0.05, self.hard_timeout_s / 4)
        while self.generation >= 0:
            time.sleep(period)
            with self._state:
                running = self._running.get(self.generation)
                if running is None or time.monotonic() - running[0] <= self.hard_timeout_s:
                    continue
                self._running.pop(self.generation, None)
                self.restarts += 1
                self.replace()
            warnings.warn(
                f"cacheaug: a coprocessor call overran the hard timeout of {self.hard_timeout_s} s; its "
                "worker was replaced.",
                stacklevel=2,
            )
            if self.on_restart is not None:
                self.on_restart()
            for future in running[1]:
                if not future.done():
                    future.set_exception(CoprocessorTimeout(f"the coprocessor overran {self.hard_timeout_s} s"))

    def submit(self, layers, length: int, last_token: int | None = None) -> cf.Future:
        future: cf.Future = cf.Future()
        ready = None
        if self.stream is not None:  # what the caller queued so far (the cache's copy) comes first
            ready = self.stream_event()
            ready.record()
        with self._state:
            self._outstanding += 1
        self.queue.put((layers, length, last_token, ready, time.monotonic(), future))
        return future

    @staticmethod
    def stream_event():
        return torch.cuda.Event()

    def idle(self) -> bool:
        """No call queued or running (a call the watchdog abandoned counts until its thread returns)."""
        with self._state:
            return self._outstanding == 0

    def replace(self) -> None:
        self.generation += 1
        thread = threading.Thread(target=self._loop, args=(self.generation,), daemon=True, name="cacheaug-coprocessor")
        thread.start()
        self._threads = [t for t in getattr(self, "_threads", []) if t.is_alive()] + [thread]

    def close(self) -> None:
        """Stop taking work; wait briefly for the threads (a hung one is left behind, as a daemon)."""
        self.generation = -1 - abs(self.generation)  # the loops and the watchdog stop
        for thread in self._threads:
            thread.join(timeout=1)

    def _run(self, items) -> list[torch.Tensor]:
        if len(items) == 1 and self.graphs is not None and self.graphs.fits(items[0][1]):
            return [self.graphs(*items[0][:3])]
        if len(items) == 1:  # one prefix: the library's own call
            layers, length, last = items[0][:3]
            last = None if last is None else torch.tensor([last], device=self.model.device)
            return [self.model.compute_latents(kv.from_layers(layers), length, last)]
        return self.model.compute_latents_batch(
            [it[0] for it in items], [it[1] for it in items], [it[2] for it in items]
        )

    def _loop(self, generation: int) -> None:
        while generation == self.generation:
            try:
                items = [self.queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            taken = len(items)
            items = [it for it in items if it[-1].set_running_or_notify_cancel()]
            with self._state:
                self._outstanding -= taken - len(items)  # cancelled while queued: skipped
            if not items:
                continue
            started = time.monotonic()
            queued_s = started - min(it[4] for it in items)  # the longest wait for this thread to pick it up
            launched = None
            self.batches += 1
            self.rows += len(items)
            with self._state:
                self._running[generation] = (started, [it[-1] for it in items])
            try:
                if self.stream is None:
                    results = self._run(items)
                    launched = time.monotonic()
                else:
                    for it in items:
                        self.stream.wait_event(it[3])
                    with torch.cuda.stream(self.stream):
                        results = self._run(items)
                    launched = time.monotonic()
                    self.stream.synchronize()
                outcome = list(zip(items, results))
            except BaseException as err:  # noqa: BLE001  every request of the batch falls back
                outcome = [(it, err) for it in items]
            if launched is not None:  # where the call's time went (benchmarks/serve_latency.py reports it)
                timing = {
                    "queued_s": queued_s,
                    "launch_s": launched - started,
                    "device_s": time.monotonic() - launched,
                    "rows": len(items),
                }
                for it in items:
                    it[-1].timing = timing
            with self._state:
                self._running.pop(generation, None)
                self._outstanding -= len(items)
                for it, result in outcome:  # a batch the watchdog failed already has its answers
                    if not it[-1].done():
                        (it[-1].set_exception if isinstance(result, BaseException) else it[-1].set_result)(result)
