"""Serving engine: the decoder never waits for the coprocessor longer than the request allows.

Policies per request (strategy objects in :mod:`~cacheaug.serving.policies`, where more can be registered):
  ``off``    plain decoding by the frozen model;
  ``sync``   augment the prompt, then decode (the paper's benchmark setting); if the coprocessor fails or misses
             the deadline, decode unaugmented;
  ``async``  the first token comes at once, as with ``off`` (the coprocessor starts after it, so it never slows
             the first token); when the latents are ready, n tokens later, they go in at their true place,
             right after the prompt, and the n tokens decoded meanwhile are replayed through the decoder in
             one pass. From then on the request continues exactly as a ``sync`` request that had produced the
             same first n tokens: late latents cost a replay of n tokens, not quality. (Inserting them after
             the n tokens instead, i.e. stale, raised the next token's perplexity by thousands of percent in
             the staleness study of docs/results.md.) With ``async_grace_s`` > 0 the first token waits that
             long for the latents. After the deadline, on failure, or beyond ``max_stale_tokens`` tokens:
             decode unaugmented.
Each request is a :class:`~cacheaug.serving.request.Request` (waiting, prefilling, waiting for latents, decoding,
done or cancelled); the engine decodes, and calls the policy's hooks after the prefill and around each token.

Offline augmentation: :meth:`Engine.augment_prefix` stores the augmented cache of a shared prefix (a document,
a system prompt) in a :class:`~cacheaug.serving.store.CacheStore`; a later request that starts with that prefix
continues from it without running the coprocessor.

One engine loop (:mod:`~cacheaug.serving.scheduler`, a thread) owns every active request: it prefills, runs the
policy hooks, inserts latents (those of every request whose latents it found ready in one iteration, and that has
decoded as many tokens, in one decoder call) and runs the decoding steps of all requests as one batch, in caches
preallocated as one slab per layer (:mod:`~cacheaug.serving.slab`; replayed CUDA graphs on a GPU);
:meth:`Engine.stream` only asks it for tokens. A request waiting for its latents, or for a slow reader, never holds the others. The coprocessor
runs on a single worker thread (its own CUDA stream on a GPU). A watchdog abandons a call that overruns the hard timeout
and replaces the worker, whatever the requests' deadlines, so a hung coprocessor cannot block later requests;
the requests waiting for it count it as late. A request can be cancelled (``cancel``, a ``threading.Event``):
it stops before its next token, freeing its slot within one decoding step.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch
from transformers import DynamicCache

from .. import kv
from ..model import CacheAugmentedLM
from ..sampling import SamplingParams, next_token
from .batching import CoprocessorTimeout, LatentsWorker
from .engine_config import STREAM_PRIORITIES, EngineConfig
from .latent_graphs import LatentGraphs
from .policies import get_policy, policy_names
from .request import Request, Step
from .runner import Runner
from .scheduler import END, Scheduler
from .slab import Slab
from .store import CacheStore


@dataclass
class Stats:
    """Counters exported by the server's /metrics, incremented under a lock (requests run on many threads)."""

    requests: int = 0
    augmented: int = 0
    late: int = 0
    failed: int = 0
    fallbacks: int = 0
    cancelled: int = 0
    store_hits: int = 0
    insert_calls: int = 0  # decoder calls that inserted latents (several requests' at once where they were ready)
    worker_restarts: int = 0
    by_policy: dict = field(default_factory=lambda: {name: 0 for name in policy_names()})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def count_policy(self, name: str) -> None:
        with self._lock:
            self.by_policy[name] = self.by_policy.get(name, 0) + 1


class Engine:
    """Decoding with optional, never-blocking cache augmentation.

    Args:
        model: a :class:`CacheAugmentedLM` (its ``base`` decodes; its coprocessor augments).
        store: where offline-augmented prefixes live (default: in memory only, 1 GiB).
        config: an :class:`EngineConfig` (its fields below; keyword arguments of the same names override it).
        default_deadline_s: how long a request waits for its latents at most (sync) / accepts them (async).
        hard_timeout_s: a coprocessor call running longer is abandoned and the worker replaced.
        async_grace_s: how long an async request's first token may wait for the latents (0: never waits).
        max_stale_tokens: an async request takes latents that arrive after decoding began only while at most this
            many tokens have been decoded (the replay's length; default 64).
        max_batch: decoding steps, and coprocessor calls, of concurrent requests run together, up to this many
            rows (1: no batching).
        static_batch: decode in a preallocated slab of caches (:mod:`~cacheaug.serving.slab`), replayed as CUDA
            graphs on a GPU; requests longer than ``static_max_len`` entries, or beyond ``max_batch`` at once, and
            backbones with other attention than sdpa or eager take the dynamic path (caches padded per step).
        static_max_len: cache entries (prompt, latents, new tokens) per request in the slab at most.
        compile_decode: ``torch.compile`` the slab's step with this backend (``"inductor"``) before recording it as a
            CUDA graph: fused kernels; the first step shape compiles, then one with symbolic sizes serves the others
            (at most four compiles; off by default).
        coprocessor_priority: ``"normal"`` or ``"high"``: the priority of the coprocessor's CUDA stream against the
            decoding stream (``"high"`` lets its kernels go first). Measured on an H200 it does not make async
            latents arrive: the call's time is its host side (kernel launches waiting for the interpreter), not the
            GPU's (docs/performance.md, "Session 18"); ``coprocessor_graphs`` addresses that. Ignored on the CPU.
        coprocessor_graphs: run a single prefix's coprocessor call (up to ``static_max_len`` positions) as a CUDA
            graph replay, one graph per 256-position bucket (:mod:`~cacheaug.serving.latent_graphs`): beside the
            engine loop the eager call's hundreds of launches each wait for the interpreter (a 1k-token prompt's
            call: 136-496 ms there, 27-41 ms alone). Same latents; sdpa or eager attention; without a GPU the same
            padded call runs eagerly.
    """

    def __init__(
        self,
        model: CacheAugmentedLM,
        store: CacheStore | None = None,
        config: EngineConfig | None = None,
        **options,
    ):
        unknown = sorted(set(options) - {f.name for f in fields(EngineConfig)})
        if unknown:
            raise TypeError(f"Engine got unknown options {unknown}; the options are EngineConfig's fields")
        config = replace(config or EngineConfig(), **options)  # keyword options (each an EngineConfig field) win
        if not model.arm.has_latents:
            raise ValueError(
                f"a {model.config.init!r} checkpoint inserts no latents, so there is nothing to augment "
                "with; serve the frozen model alone (no --coprocessor) or a coprocessor checkpoint"
            )
        self.config = config
        self.model = model
        self.base = model.base
        self.store = store if store is not None else CacheStore(max_bytes=1 << 30)  # an empty store is falsy
        self.stats = Stats()
        self.lock = threading.Lock()  # one decoder step at a time on the device
        stream = None
        if model.device.type == "cuda":  # CUDA: lower numbers run first; -1 is the highest priority torch offers
            stream = torch.cuda.Stream(device=model.device, priority=STREAM_PRIORITIES[config.coprocessor_priority])
        graphs = LatentGraphs(model, max_length=config.static_max_len) if config.coprocessor_graphs else None
        self.worker = LatentsWorker(
            model,
            stream,
            max_batch=config.max_batch,
            hard_timeout_s=config.hard_timeout_s,
            on_restart=lambda: self.stats.add(worker_restarts=1),
            graphs=graphs,
        )
        self.slab = None
        if config.static_batch and model.family.attn_implementation in Slab.ATTENTION:
            self.slab = Slab(model, config.max_batch, max_length=config.static_max_len, compile=config.compile_decode)
        self.scheduler = Scheduler(self, Runner(self), max_batch=config.max_batch)  # the loop: every request's decoding

    # -------------------------------------------------------------------------------------------- worker
    def submit_latents(self, cache: DynamicCache, length: int, last_token: int) -> cf.Future:
        """Queue the coprocessor on the first ``length`` positions of ``cache`` (a snapshot: decoding goes on), whose
        last token is ``last_token``; queued prefixes of concurrent requests run as one batch."""
        return self.worker.submit(kv.layers(kv.fork(cache, length)), length, last_token)

    # -------------------------------------------------------------------------------------------- decoding
    def _forward(self, cache: DynamicCache, ids: torch.Tensor, augmented: bool) -> torch.Tensor:
        """Decode ``ids`` after ``cache`` (the next token's rotary position follows from its length and whether it
        holds latents: CacheAugmentedLM.next_position)."""
        position = self.model.next_position(cache.get_seq_length(), augmented)
        with self.lock:
            out = self.model.decode(cache, ids, position, logits_to_keep=1)
        return out.logits[:, -1]

    def _insert(
        self, cache: DynamicCache, latents: torch.Tensor, last_token: int, then: list[int] | None = None
    ) -> torch.Tensor:
        device = self.model.device
        with self.lock:
            return self.model.insert_latents(
                cache,
                latents,
                torch.tensor([last_token], device=device),
                torch.tensor([then], device=device) if then else None,
            )

    @staticmethod
    def choose(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
        """The next token from ``logits`` ``[1, V]`` (greedy at temperature 0, else sampled with ``generator``)."""
        return int(next_token(logits, SamplingParams(temperature, None, top_p), generator)[0])

    @property
    def can_augment(self) -> bool:
        """A coprocessor is loaded and on (``serve`` without one decodes the frozen model alone)."""
        return self.model.enabled

    def prefill(self, prompt: list[int], use_store: bool = True) -> tuple[DynamicCache, torch.Tensor, bool]:
        """Cache and next-token logits for ``prompt``, starting from the longest stored augmented prefix (unless
        ``use_store`` is off: a policy that never augments must give the frozen model's output)."""
        ids = torch.tensor([prompt], device=self.model.device)
        hit = self.store.longest_prefix(prompt) if use_store else None
        if hit is not None:
            try:
                cache, logits, n = self.store.load(
                    hit,
                    self.model.device,
                    n_layers=self.base.config.num_hidden_layers,
                    n_latents=self.model.config.n_inserted,
                )
            except KeyError:  # a bad entry was discarded (with a warning): compute the prompt afresh
                hit = None
        if hit is not None:
            self.stats.add(store_hits=1)
            rest = ids[:, n:]
            if rest.shape[1]:
                logits = self._forward(cache, rest, augmented=True)
            return cache, logits, True
        cache = DynamicCache()
        return cache, self._forward(cache, ids, augmented=False), False

    def stream(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        policy: str = "sync",
        deadline_s: float | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: tuple[int, ...] = (),
        seed: int | None = None,
        cancel: threading.Event | None = None,
        info: dict | None = None,
    ) -> Iterator[Step]:
        """Decode up to ``max_new_tokens`` after ``prompt`` (token ids), yielding :class:`Step` per token, with the
        augmentation ``policy`` (:mod:`~cacheaug.serving.policies`: off, sync, async or a registered one). The
        request is advanced by the engine loop, one token per token asked for. With ``cancel`` set the request stops
        before its next token; ``info`` (a dict) receives this request's own ``outcome`` (``augmented``, ``late``,
        ``failed`` or ``None``), ``cancelled``, its ``states``, once the coprocessor call it started has ended
        ``latents_s`` (seconds from submission to its end), and once its latents went in ``insert_s`` and
        ``insert_rows`` (:meth:`insert_pending`)."""
        strategy = get_policy(policy)
        if strategy.needs_gate and not self.has_gate:
            raise ValueError(
                f"the {policy!r} policy needs a coprocessor with a gate: fit one with `cacheaug train-gate "
                "--checkpoint CKPT --data ...` and serve that checkpoint"
            )
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens < 1:
            return
        info = {} if info is None else info
        info.update(outcome=None, cancelled=False)
        req = Request(
            list(prompt),
            self.clock() + (self.config.default_deadline_s if deadline_s is None else deadline_s),
            cancel,
            info,
            strategy=strategy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=tuple(stop_ids),
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        )
        info["states"] = req.history
        req.enter("waiting")
        self.stats.add(requests=1)
        self.stats.count_policy(policy)
        req.demand = 1  # the first token is asked for with the request itself: one wake-up of the loop
        self.scheduler.add(req)
        try:
            while True:
                item = req.out.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                self.scheduler.ask(req)  # the reader wants the next one
        finally:
            if not req.finished:  # the consumer stopped reading: the loop drops the request
                req.abandoned = True
                self.scheduler.wake()

    # ------------------------------------------------------------------------------------- policy primitives
    clock = staticmethod(time.monotonic)

    @property
    def has_gate(self) -> bool:
        return self.can_augment and self.model.gate is not None

    def gate_fires(self, req: Request) -> bool:
        """The gate's decision at the end of ``req``'s prompt (just prefilled): the frozen decoder's last hidden state
        there, from one decoder call on the prompt's last token over the cache of the tokens before it."""
        with self.lock:
            h = self.model.last_state(req.cache, torch.tensor(req.prompt[-1:]))
            fire = bool(self.model.gate_fires(h)[0])
        req.info["gate"] = fire
        return fire

    def submit(self, req: Request) -> None:
        """Queue the coprocessor on ``req``'s prompt (a snapshot of its cache: decoding goes on)."""
        req.future = self.submit_latents(req.cache, len(req.prompt), req.prompt[-1])
        req.submitted = True
        start, info = self.clock(), req.info  # how long the call took, even if the request stopped waiting for it

        def took(future):  # and where that time went: waiting for the worker, launching its kernels, the device
            info.update(latents_s=self.clock() - start, **getattr(future, "timing", {}))

        req.future.add_done_callback(took)

    def wait_and_insert(self, req: Request, seconds: float) -> None:
        """Let ``req`` wait at most ``seconds`` for its latents (the engine loop goes on with the other requests),
        then insert them if they came; the policy's ``after_wait`` runs when the wait is over."""
        if req.future is None:
            return
        req.wait_until = self.clock() + max(0.0, seconds)
        req.enter("waiting_for_latents")
        req.future.add_done_callback(self.scheduler.wake)

    def insert_if_ready(self, req: Request) -> None:
        """If ``req``'s latents have arrived, have them inserted at their true place (right after the prompt),
        replaying the tokens decoded since: the engine loop inserts them before the request's next token, in one
        decoder call with those of the other requests it found ready (:meth:`insert_pending`), and sets
        ``req.augmented`` then. A failed call is counted and the request goes on unaugmented."""
        if req.future is None or not req.future.done():
            return
        latents = self._latents_or_none(req.future, req.info)
        req.future = None
        req.latents = latents

    def insert_pending(self, reqs: list[Request]) -> None:
        """Insert the arrived latents of ``reqs`` (requests that decoded the same number of tokens) in one decoder
        call: each cache becomes its prompt, its latents, then its tokens replayed, as if inserted alone
        (:meth:`CacheAugmentedLM.insert_latents_rows`). Each request's ``info["insert_s"]`` is its share of the
        call's time on the engine loop's thread (host side: launches, any wait for the device), which every other
        request of the loop waits through; ``insert_rows`` the requests that shared it."""
        start, n, device = self.clock(), reqs[0].n, self.model.device
        if any(r.n != n for r in reqs):
            raise ValueError("latents go in together only for requests that decoded the same number of tokens")
        if len(reqs) == 1:
            (req,) = reqs
            if n == 0:
                req.logits = self._insert(req.cache, req.latents, req.prompt[-1])
            else:
                req.cache, req.logits = self._insert_and_replay(req.cache, req.prompt, req.latents, req.generated)
        else:
            caches = [kv.fork(r.cache, len(r.prompt)) for r in reqs]
            then = torch.tensor([r.generated for r in reqs], device=device) if n else None
            with self.lock:
                new, logits = self.model.insert_latents_rows(
                    caches,
                    torch.cat([r.latents for r in reqs]),
                    torch.tensor([r.prompt[-1] for r in reqs], device=device),
                    then,
                )
            for i, (req, cache) in enumerate(zip(reqs, new)):
                req.cache, req.logits = cache, logits[i : i + 1]
        share = (self.clock() - start) / len(reqs)
        for req in reqs:
            req.latents, req.augmented, req.inserted_after = None, True, n
            req.info.update(outcome="augmented", insert_s=share, insert_rows=len(reqs))
        self.stats.add(augmented=len(reqs), insert_calls=1)

    def give_up(self, req: Request) -> None:
        """Drop ``req``'s pending coprocessor call (skipped by the worker if still queued) and count it late."""
        if req.future is not None:
            req.future.cancel()
            req.future = None
            self._late(req.info)

    def _late(self, info: dict) -> None:
        info["outcome"] = "late"
        self.stats.add(late=1, fallbacks=1)

    def _insert_and_replay(self, cache: DynamicCache, prompt: list[int], latents: torch.Tensor, tokens: list[int]):
        """A new cache: the prompt's positions of ``cache``, then ``latents``, then ``tokens`` replayed; and the
        next-token logits. Equal to augmenting the prompt and then decoding ``tokens``."""
        fresh = kv.fork(cache, len(prompt))
        logits = self._insert(fresh, latents, prompt[-1], tokens)  # the latents and the replay in one decoder call
        return fresh, logits

    def _latents_or_none(self, future: cf.Future, info: dict):
        """The latents of a finished ``future``, or None (counted, and warned) when the coprocessor failed, gave
        non-finite values (the request is then decoded exactly as the frozen model would) or the watchdog abandoned
        it (late)."""
        try:
            latents = future.result(timeout=0)
            if not torch.isfinite(latents).all():  # one host sync per insertion
                raise FloatingPointError("non-finite latents")
            return latents
        except KeyboardInterrupt:
            raise
        except CoprocessorTimeout:  # the watchdog already warned and replaced the worker
            self._late(info)
            return None
        except BaseException as err:  # failed, cancelled or killed (SystemExit in its thread): decode unaugmented
            info["outcome"] = "failed"
            self.stats.add(failed=1, fallbacks=1)
            warnings.warn(
                f"cacheaug: coprocessor failed ({type(err).__name__}: {err}); decoding without it.", stacklevel=3
            )
            return None

    def generate(self, prompt: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], dict]:
        """All tokens of :meth:`stream` at once, and a summary of the augmentation."""
        steps = list(self.stream(prompt, max_new_tokens, **kwargs))
        info = {
            "augmented": bool(steps and steps[-1].augmented),
            "inserted_after": steps[-1].inserted_after if steps else None,
        }
        return [s.token for s in steps], info

    # -------------------------------------------------------------------------------------------- offline
    @torch.no_grad()
    def augment_prefix(self, prefix: list[int], deadline_s: float | None = None) -> str:
        """Augment ``prefix`` now, store the augmented cache, and return its id. The coprocessor runs on its worker
        (the decoder is not held while it runs); if it has not answered within ``deadline_s`` (default: the hard
        timeout) :class:`TimeoutError` is raised and nothing is stored."""
        if not prefix:
            raise ValueError("the prefix has no tokens")
        cache = DynamicCache()
        self._forward(cache, torch.tensor([prefix], device=self.model.device), augmented=False)
        future = self.submit_latents(cache, len(prefix), prefix[-1])
        try:
            latents = future.result(timeout=self.config.hard_timeout_s if deadline_s is None else deadline_s)
        except (cf.TimeoutError, CoprocessorTimeout):
            future.cancel()
            raise TimeoutError("the coprocessor did not answer within the deadline; nothing was stored") from None
        if not torch.isfinite(latents).all():
            raise FloatingPointError("the coprocessor produced non-finite latents; nothing was stored")
        logits = self._insert(cache, latents, prefix[-1])
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the augmented cache gives non-finite logits; nothing was stored")
        return self.store.put(prefix, cache, logits)

    def close(self) -> None:
        self.scheduler.close()
        self.worker.close()
