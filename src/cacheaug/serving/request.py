"""A request's state inside the serving engine: :class:`Request` (the cache, the next token's logits, the pending
coprocessor call, its states ``waiting`` -> ``prefilling`` -> (``waiting_for_latents``) -> ``decoding`` -> ``done``
or ``cancelled``) and :class:`Step`, one decoded token as the client receives it. Policies (policies.py) read and
the engine loop (scheduler.py) advances them.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from .slab import Slab

State = Literal["waiting", "prefilling", "waiting_for_latents", "decoding", "done", "cancelled"]


@dataclass
class Step:
    """One decoded token of a request, and what happened to the augmentation so far."""

    token: int
    augmented: bool  # latents are in the cache (inserted before this token was chosen)
    inserted_after: int | None  # tokens decoded before the latents went in (0 = before the first token)


@dataclass
class Request:
    """One request's state inside the engine (the cache, the logits for its next token, the pending coprocessor
    call) and its outcome: ``info["outcome"]`` is ``augmented``, ``late``, ``failed`` or None."""

    prompt: list[int]
    deadline: float
    cancel: threading.Event | None = None
    info: dict = field(default_factory=dict)
    state: State = "waiting"
    _cache: DynamicCache | None = None  # see ``cache``
    logits: torch.Tensor | None = None
    augmented: bool = False  # latents are in the cache
    inserted_after: int | None = None  # tokens decoded before they went in (0: before the first token)
    wants: bool = False  # the policy may augment: a coprocessor is loaded and the prompt was not in the store
    future: cf.Future | None = None  # a pending coprocessor call
    latents: torch.Tensor | None = None  # arrived and checked, to be inserted by the engine loop with the others'
    submitted: bool = False
    generated: list[int] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # the states it went through, in order
    # decoding parameters, and the engine loop's bookkeeping
    strategy: Any = None  # the request's Policy (policies.py)
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    phase: str = "prefill"  # prefill, before, choose, after, step
    demand: int = 0  # tokens the consumer asked for and has not received
    wait_until: float = 0.0  # the end of a wait for the latents (monotonic seconds)
    out: queue.Queue = field(default_factory=queue.Queue)  # Steps, then END (or an exception)
    finished: bool = False
    abandoned: bool = False  # the consumer stopped reading
    slab: Slab | None = None  # while decoding by static batches: the engine's slab and this request's row in it
    slot: int | None = None
    choice: tuple | None = None  # (greedy token, the logits it was chosen from), computed with the batch's step

    @property
    def cache(self) -> DynamicCache | None:
        """The request's cache (prompt, latents if inserted, tokens decoded): while it holds a row of the engine's
        slab, a view of that row. Assigning another cache (e.g. after latents were inserted and tokens replayed) is
        allowed at any time: the row takes it before the next decoding step."""
        if self._cache is None and self.slot is not None:
            self._cache = self.slab.view(self.slot)
        return self._cache

    @cache.setter
    def cache(self, value: DynamicCache | None) -> None:
        self._cache = value

    @property
    def n(self) -> int:
        """Tokens decoded so far."""
        return len(self.generated)

    def enter(self, state: State) -> None:
        self.state = state
        self.history.append(state)
