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

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@torch.no_grad()
def batched_step(base, cache_kwarg: str, caches: list[DynamicCache], tokens: list[int]):
    """One decoding step for every (cache, token) pair; returns (new caches, logits [B, V])."""
    device = caches[0].layers[0].keys.device
    lengths = [c.layers[0].keys.shape[2] for c in caches]
    longest = max(lengths)
    kv = []
    for layer in range(len(caches[0].layers)):
        keys = [F.pad(c.layers[layer].keys, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)]
        values = [F.pad(c.layers[layer].values, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)]
        kv.append((torch.cat(keys), torch.cat(values)))
    batch = DynamicCache(ddp_cache_data=kv)
    mask = torch.zeros(len(caches), longest + 1, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1
    out = base(input_ids=torch.tensor(tokens, device=device)[:, None],
               position_ids=torch.tensor(lengths, device=device)[:, None], attention_mask=mask,
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

    def step(self, cache: DynamicCache, token: int) -> tuple[DynamicCache, torch.Tensor]:
        """Submit one step and wait for it: the request's new cache and next-token logits ``[1, V]``."""
        future: cf.Future = cf.Future()
        self.queue.put((cache, token, future))
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
                    caches, logits = batched_step(self.base, self.cache_kwarg, [c for c, _, _ in items],
                                                  [t for _, t, _ in items])
                self.batches += 1
                self.rows += len(items)
                for i, (_, _, future) in enumerate(items):
                    future.set_result((caches[i], logits[i : i + 1]))
            except BaseException as err:  # every waiting request learns of it
                for _, _, future in items:
                    future.set_exception(err)

    def close(self) -> None:
        self.queue.put(None)
