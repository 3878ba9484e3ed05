"""Augmentation policies: small strategy objects with hooks, called by :meth:`Engine.stream` for each request.

A request (:class:`Request`) moves through the states ``waiting`` -> ``prefilling`` -> (``waiting_for_latents``)
-> ``decoding`` -> ``done`` or ``cancelled``. The engine loop (:mod:`~cacheaug.serving.scheduler`) owns decoding;
a policy only decides *when* the coprocessor runs and *when* its latents go in, through four hooks, all called on
the loop's thread (so they must not block) with the engine's primitives:

- ``after_prefill(engine, req)``: the prompt is cached, no token chosen yet;
- ``before_token(engine, req)``: before the token number ``req.n`` (0-based) is chosen;
- ``after_token(engine, req)``: after it was chosen and handed to the client, before the next decoding step;
- ``after_wait(engine, req)``: a wait started by ``wait_and_insert`` is over (the latents are in, or not).

The primitives: ``engine.submit(req)`` queues the coprocessor on the prompt (a snapshot of the cache: decoding
goes on); ``engine.wait_and_insert(req, seconds)`` makes the request wait that long at most for the latents (the
other requests go on), then inserts them if they came; ``engine.insert_if_ready(req)`` inserts them if they have
arrived (at their true place, right after the prompt, replaying the tokens decoded meanwhile: the request then
continues exactly as if augmented before its first token); ``engine.give_up(req)`` drops a pending call and counts
the request late. Whatever is still pending when the request ends is given up. ``req.deadline`` (monotonic
seconds) is the request's own limit.

Adding a policy is one new file and one line::

    from cacheaug.serving.policies import Policy, register_policy


    class AfterTwo(Policy):
        name, summary = "after-two", "start the coprocessor after two tokens; wait for it before the third"

        def after_token(self, engine, req):
            if req.n == 2 and req.wants:
                engine.submit(req)

        def before_token(self, engine, req):
            engine.wait_and_insert(req, req.deadline - engine.clock())


    register_policy(AfterTwo())

after which ``Engine.stream(..., policy="after-two")``, the server's ``"augment": "after-two"`` and
``cacheaug serve --policy after-two`` accept it (``tests/test_serving_policies.py`` runs this example as written).
"""

from __future__ import annotations

from typing import Protocol

from .engine_config import EngineConfig
from .request import Request, State, Step  # noqa: F401  (a request's state; re-exported for policy authors)


class Engine(Protocol):
    """What a policy may call: the engine's primitives (cacheaug.serving.Engine provides them; a policy never needs
    the engine itself, so this module does not import it)."""

    config: EngineConfig  # async_grace_s, max_stale_tokens, ...

    def clock(self) -> float: ...
    def submit(self, req: Request) -> None: ...
    def wait_and_insert(self, req: Request, seconds: float) -> None: ...
    def insert_if_ready(self, req: Request) -> None: ...
    def give_up(self, req: Request) -> None: ...
    def gate_fires(self, req: Request) -> bool: ...


class Policy:
    """Base policy: never augments (the hooks do nothing). Subclasses set ``name`` and ``summary``."""

    name: str = ""
    summary: str = ""
    augments: bool = True  # False: the frozen model bit for bit (no stored augmented prefix is read either)
    needs_gate: bool = False  # True: only for a coprocessor with a gate (cacheaug.gate; `cacheaug train-gate`)

    def after_prefill(self, engine: Engine, req: Request) -> None:
        pass

    def before_token(self, engine: Engine, req: Request) -> None:
        pass

    def after_token(self, engine: Engine, req: Request) -> None:
        pass

    def after_wait(self, engine: Engine, req: Request) -> None:
        pass


class Off(Policy):
    name, summary, augments = "off", "plain decoding by the frozen model", False


class Sync(Policy):
    name, summary = (
        "sync",
        ("augment the prompt, then decode (the paper's setting); past the deadline or on failure, decode unaugmented"),
    )

    def after_prefill(self, engine, req):
        if req.wants:
            engine.submit(req)
            engine.wait_and_insert(req, req.deadline - engine.clock())

    def after_wait(self, engine, req):
        engine.give_up(req)  # missed the deadline (if still pending): not waited for again


class Async(Policy):
    name, summary = (
        "async",
        (
            "the first token at once (or within the grace time); latents that arrive later go in "
            "at their true place and the tokens decoded meanwhile are replayed"
        ),
    )

    def after_prefill(self, engine, req):
        if req.wants and engine.config.async_grace_s > 0:
            engine.submit(req)
            engine.wait_and_insert(req, min(engine.config.async_grace_s, req.deadline - engine.clock()))

    def before_token(self, engine, req):
        if req.future is None or req.n == 0:
            return
        if engine.clock() > req.deadline or req.n > engine.config.max_stale_tokens:
            engine.give_up(req)
        else:
            engine.insert_if_ready(req)

    def after_token(self, engine, req):
        if req.wants and not req.submitted:  # only after the first token, which never waits for the coprocessor
            engine.submit(req)


class Gated(Sync):
    name, summary, needs_gate = (
        "gate",
        (
            "augment the prompt as sync only where the coprocessor's gate fires at its "
            "end; elsewhere the frozen model's decoding"
        ),
        True,
    )

    def after_prefill(self, engine, req):
        if req.wants and engine.gate_fires(req):
            super().after_prefill(engine, req)


_POLICIES: dict[str, Policy] = {}


def register_policy(policy: Policy) -> Policy:
    """Make ``policy`` available by its name to the engine, the server and ``cacheaug serve --policy``."""
    if not isinstance(policy, Policy) or not policy.name or not isinstance(policy.name, str):
        raise ValueError(f"a policy is a Policy instance with a name, got {policy!r}")
    _POLICIES[policy.name] = policy
    return policy


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def get_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(policy_names())}") from None


for _p in (Off(), Sync(), Async(), Gated()):
    register_policy(_p)
