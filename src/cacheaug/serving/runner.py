"""The model side of the engine loop: one decoding step of a batch of requests, in the engine's slab for those that
hold (or can take) a row of it, else by the dynamic path (caches left-padded and split again), the greedy rows'
tokens read to the host together; and a finished request's row given back.

The scheduler (scheduler.py) decides what runs and in which batches; this runs it. Tests drive the scheduler without a
model through a runner of their own (tests/test_scheduler_model_free.py).
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams, next_token
from .batching import batched_step


class Runner:
    """Decoding steps for an :class:`~cacheaug.serving.engine.Engine` (its model, slab and device lock)."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, rows) -> None:
        """One decoding step of ``rows`` (their last tokens, batched): each request's ``logits`` (and cache) move
        on by one token; a greedy request's next token is computed with the batch (``choice``)."""
        engine, model, slab = self.engine, self.engine.model, self.engine.slab
        static = [r for r in rows if slab is not None and self._take_row(slab, r)]
        dynamic = [r for r in rows if r.slot is None]
        if static:
            positions = [model.next_position(slab.length[r.slot], r.augmented) for r in static]
            with engine.lock:
                logits = slab.step([r.slot for r in static], [r.generated[-1] for r in static], positions)
            for i, req in enumerate(static):
                req.cache, req.logits = None, logits[i : i + 1]  # the row holds the cache; a view when asked
            self._greedy_choices(static, logits)
        if len(dynamic) == 1:
            req = dynamic[0]
            req.logits = engine._forward(
                req.cache, torch.tensor([[req.generated[-1]]], device=model.device), req.augmented
            )
        elif dynamic:
            positions = [model.next_position(r.cache.get_seq_length(), r.augmented) for r in dynamic]
            with engine.lock:
                caches, logits = batched_step(
                    model.base,
                    model.family.cache_kwarg,
                    [r.cache for r in dynamic],
                    [r.generated[-1] for r in dynamic],
                    positions,
                )
            for i, req in enumerate(dynamic):
                req.cache, req.logits = caches[i], logits[i : i + 1]
            self._greedy_choices(dynamic, logits)

    def release(self, req) -> None:
        """A finished request's row of the slab is free for the next one."""
        if req.slot is not None:
            req.slab.release(req.slot)
            req.slot, req.cache = None, None

    def _take_row(self, slab, req) -> bool:
        """Give ``req`` a row of ``slab`` (copying its cache in), or copy a replaced cache into its row; False when
        it cannot have one (too long for the slab, or every row in use)."""
        if req.slot is None:
            longest = len(req.prompt) + self.engine.model.config.n_inserted + req.max_new_tokens
            if not slab.fits(longest) or not slab.has_room():
                return False
            req.slot, req.slab = slab.adopt(req.cache, reserve=longest - len(req.prompt)), slab
            req.cache = None
        elif req._cache is not None and not slab.holds(req.slot, req._cache):
            slab.adopt(req._cache, req.slot)
            req.cache = None
        return True

    @staticmethod
    def _greedy_choices(rows, logits) -> None:
        """The greedy rows' next tokens, read to the host together (one transfer instead of one per request)."""
        greedy = [i for i, r in enumerate(rows) if SamplingParams(r.temperature).greedy]
        if greedy:
            tokens = next_token(logits if len(greedy) == len(rows) else logits[greedy], SamplingParams()).tolist()
            for i, token in zip(greedy, tokens):
                rows[i].choice = (token, rows[i].logits)
