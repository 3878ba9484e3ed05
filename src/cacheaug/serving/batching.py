"""Batched decoding steps for concurrent requests whose caches have different lengths.

Each request keeps its own ``DynamicCache``. A decoding step of several requests left-pads their caches to a
common length, runs the frozen decoder once on one new token per row (explicit positions; a 2D attention
mask hides the padding), and splits the result back into one cache per request. Left padding keeps every
row's query-to-key distances, so sliding-window layers mask exactly as they do unbatched.

:class:`StepBatcher` gathers the steps that requests submit from their own threads and runs them together.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def left_pad(kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], extra: int):
    """Per-layer ``(keys, values)`` of several caches left-padded to the longest and stacked on the batch axis,
    and the 2D attention mask ``[B, longest + extra]`` (1 = real position; ``extra`` new positions per row)."""
    longest = max(lengths)
    padded = []
    for layer in range(len(kvs[0])):
        keys = [F.pad(kv[layer][0], (0, 0, longest - n, 0)) for kv, n in zip(kvs, lengths)]
        values = [F.pad(kv[layer][1], (0, 0, longest - n, 0)) for kv, n in zip(kvs, lengths)]
        padded.append((torch.cat(keys), torch.cat(values)))
    mask = torch.zeros(len(kvs), longest + extra, dtype=torch.long, device=kvs[0][0][0].device)
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1
    return padded, mask


@torch.no_grad()
def batched_step(base, cache_kwarg: str, caches: list[DynamicCache], tokens: list[int], positions: list[int] | None = None):
    """One decoding step for every (cache, token) pair, each token at its rotary position (default: its cache's
    length); returns (new caches, logits [B, V])."""
    lengths = [c.layers[0].keys.shape[2] for c in caches]
    longest = max(lengths)
    kv, mask = left_pad([[(layer.keys, layer.values) for layer in c.layers] for c in caches], lengths, 1)
    batch = DynamicCache(ddp_cache_data=kv)
    device = mask.device
    out = base(input_ids=torch.tensor(tokens, device=device)[:, None],
               position_ids=torch.tensor(lengths if positions is None else positions, device=device)[:, None],
               attention_mask=mask,
               use_cache=True, logits_to_keep=1, **{cache_kwarg: batch})
    new = [DynamicCache(ddp_cache_data=[(layer.keys[i : i + 1, :, longest - n :], layer.values[i : i + 1, :, longest - n :])
                                        for layer in batch.layers]) for i, n in enumerate(lengths)]
    return new, out.logits[:, -1]


class StepBatcher:
    """Runs the decoding steps submitted by concurrent requests in batches of up to ``max_batch``."""

    def __init__(self, base, cache_kwarg: str, lock: threading.Lock, max_batch: int = 16, wait_s: float = 0.002):
        self.base, self.cache_kwarg, self.lock = base, cache_kwarg, lock
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cacheaug-batcher")
        self._thread.start()

    def step(self, cache: DynamicCache, token: int, position: int | None = None) -> tuple[DynamicCache, torch.Tensor]:
        """Submit one step (``token`` at rotary ``position``, default the cache length) and wait for it: the
        request's new cache and next-token logits ``[1, V]``."""
        future: cf.Future = cf.Future()
        length = cache.layers[0].keys.shape[2] if cache.layers else 0
        self.queue.put((cache, token, length if position is None else position, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            items = [first]
            try:
                while len(items) < self.max_batch:
                    item = self.queue.get(timeout=self.wait_s)
                    if item is None:
                        self.queue.put(None)
                        break
                    items.append(item)
            except queue.Empty:
                pass
            try:
                with self.lock:
                    caches, logits = batched_step(self.base, self.cache_kwarg, [it[0] for it in items],
                                                  [it[1] for it in items], [it[2] for it in items])
                self.batches += 1
                self.rows += len(items)
                for i, it in enumerate(items):
                    it[-1].set_result((caches[i], logits[i : i + 1]))
            except BaseException as err:  # every waiting request learns of it
                for it in items:
                    it[-1].set_exception(err)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)


@torch.no_grad()
def batched_latents(model, kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int],
                    last_tokens: list[int] | None = None) -> list[torch.Tensor]:
    """The coprocessor's latents for several prefixes at once (left-padded, masked): one ``[1, N_L, D]`` each.
    ``last_tokens``: each prefix's last token id (needed with ``echo_residual``)."""
    n_latents = model.config.n_latents
    padded, mask = left_pad(kvs, lengths, n_latents)
    device = mask.device
    positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(n_latents, device=device)
    echo = None
    if model.config.echo_residual:
        echo = model.base.get_input_embeddings()(torch.tensor(last_tokens, device=device)[:, None])  # [B, 1, D]
    latents = model.coprocessor(padded, len(kvs), 1, positions, mask, echo)  # [B, N_L, D]
    return [latents[i : i + 1] for i in range(len(kvs))]


class LatentsWorker:
    """The coprocessor's worker thread: takes the queued prefixes, runs them as one batch, fulfils the futures.

    A hung batch cannot block later requests: :meth:`replace` starts a new thread on the same queue, and the
    old one exits once (if ever) its batch returns. A queued job whose future was cancelled is skipped.
    """

    def __init__(self, model, stream=None, max_batch: int = 16):
        self.model, self.stream, self.max_batch = model, stream, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.generation = 0
        self.batches = 0
        self.rows = 0
        self.replace()

    def submit(self, kv, length: int, last_token: int | None = None) -> cf.Future:
        future: cf.Future = cf.Future()
        future.started_at = None
        self.queue.put((kv, length, last_token, future))
        return future

    def replace(self) -> None:
        self.generation += 1
        thread = threading.Thread(target=self._loop, args=(self.generation,), daemon=True, name="cacheaug-coprocessor")
        thread.start()
        self._threads = [t for t in getattr(self, "_threads", []) if t.is_alive()] + [thread]

    def close(self) -> None:
        """Stop taking work; wait briefly for the threads (a hung one is left behind, as a daemon)."""
        self.generation += 1
        for thread in self._threads:
            thread.join(timeout=1)

    def _run(self, items) -> list[torch.Tensor]:
        if len(items) == 1:  # one prefix: the library's own call
            kv, length, last, _ = items[0]
            last = None if last is None else torch.tensor([last], device=self.model.device)
            return [self.model.compute_latents(DynamicCache(ddp_cache_data=kv), length, last)]
        return batched_latents(self.model, [it[0] for it in items], [it[1] for it in items], [it[2] for it in items])

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
            items = [it for it in items if it[-1].set_running_or_notify_cancel()]
            if not items:
                continue
            started = time.monotonic()
            self.batches += 1
            self.rows += len(items)
            for it in items:
                it[-1].started_at = started
            try:
                if self.stream is None:
                    results = self._run(items)
                else:
                    with torch.cuda.stream(self.stream):
                        results = self._run(items)
                    self.stream.synchronize()
                for it, latents in zip(items, results):
                    it[-1].set_result(latents)
            except BaseException as err:  # noqa: BLE001  every request of the batch falls back
                for it in items:
                    it[-1].set_exception(err)
