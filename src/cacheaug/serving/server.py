"""HTTP server: OpenAI-compatible completions over the :class:`~cacheaug.serving.engine.Engine`.

    cacheaug serve --model gemma-3-270m --coprocessor ckpt/          # binds 127.0.0.1:8000 unless told otherwise

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with SSE when ``stream``; chat uses
the tokenizer's chat template when it has one), ``GET /v1/models``,
``POST /v1/augment`` (store the augmented cache of a shared prefix; later prompts starting with it reuse it),
``GET /health``, ``GET /metrics`` (Prometheus). Request fields beyond OpenAI's: ``augment`` (``off`` | ``sync`` |
``async``, default from the server) and ``deadline_ms``. Bodies are validated (422/400 with the reason); at most
``max_concurrent`` requests decode at once and at most ``max_queue`` wait, beyond that 429; a request that
cannot start within ``queue_timeout_s`` gets 503. Admission happens on the event loop (no thread waits for a
slot), and a client that disconnects (a closed stream, a timed-out request) is cancelled: its slot is free
within one decoding step. Nothing in a request is executed or unpickled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .policies import get_policy
from .protocol import AugmentRequest, ChatMessage, ChatRequest, CompletionRequest, TextStream, _validation_message

log = logging.getLogger("cacheaug.serve")


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    return reg, {
        "requests": Counter("cacheaug_requests", "Completion requests", ["endpoint", "policy", "status"], registry=reg),
        "latency": Histogram("cacheaug_request_seconds", "Request latency", ["endpoint"], registry=reg),
        "ttft": Histogram("cacheaug_time_to_first_token_seconds", "Time to first token", ["policy"], registry=reg),
        "augment": Counter("cacheaug_augmentations", "Augmentations by outcome", ["outcome"], registry=reg),
        "store_bytes": Gauge("cacheaug_store_bytes", "Bytes of augmented caches in memory", registry=reg),
        "store_entries": Gauge("cacheaug_store_entries", "Stored augmented prefixes", registry=reg),
        "store_hits": Gauge("cacheaug_store_hits", "Requests that reused a stored prefix", registry=reg),
    }


@dataclass
class _Call:
    """One completion request on its way through the server: what it asked for, its cancel event, how its slot goes
    back (once, from the decoding thread), and the OpenAI envelope of its answers."""

    body: object
    prompt_ids: list[int]
    endpoint: str
    chat: bool
    policy: str
    model_name: str
    loop: asyncio.AbstractEventLoop
    release: object
    cancel: threading.Event = field(default_factory=threading.Event)
    rid: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, text: str, finish, extra: dict | None = None) -> dict:
        stream = self.body.stream
        if self.chat:
            key = "delta" if stream else "message"
            choice = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "choices": [choice],
            **(extra or {}),
        }

    def usage(self, n_tokens: int) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": n_tokens, "total_tokens": n + n_tokens}


class _Service:
    """The HTTP app's state (the engine, the tokenizer, the decoding slots, the metrics) and its handlers, each a small
    method; :func:`create_app` routes the endpoints to them."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        model_name: str,
        aliases: tuple[str, ...],
        default_policy: str,
        max_concurrent: int,
        max_queue: int,
        queue_timeout_s: float,
    ):
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.aliases, self.default_policy = model_name, aliases, default_policy
        self.max_concurrent, self.max_queue, self.queue_timeout_s = max_concurrent, max_queue, queue_timeout_s
        self.started = int(time.time())
        self.registry, self.m = _metrics()
        self.slots = asyncio.Semaphore(max_concurrent)  # taken and given back on the event loop only
        self.admitted = 0  # requests holding or waiting for a slot
        self.decoders = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="cacheaug-request")
        self.max_context = getattr(engine.base.config, "max_position_embeddings", None)
        self.n_latents = engine.model.config.n_latents
        self.eos = tokenizer.eos_token_id
        self.special = set(tokenizer.all_special_ids)

    def encode(self, text: str, max_tokens: int, templated: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not set(ids) - self.special:  # nothing but the <bos> the tokenizer adds
            raise HTTPException(422, "the prompt has no tokens after tokenisation: send some text")
        if self.max_context is not None and len(ids) + self.n_latents + max_tokens > self.max_context:
            raise HTTPException(
                400,
                f"prompt of {len(ids)} tokens + {max_tokens} new tokens + {self.n_latents} latents "
                f"exceeds the model's context of {self.max_context}",
            )
        return ids

    def chat_text(self, messages: list[ChatMessage]) -> tuple[str, bool]:
        """The prompt of a chat: the tokenizer's chat template when it has one (its text carries its own special
        tokens), else plain ``role: content`` lines ending in ``assistant:``."""
        msgs = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text} for msg in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), True
        return "".join(f"{msg['role']}: {msg['content']}\n" for msg in msgs) + "assistant:", False

    def check_model(self, name: str | None) -> None:
        """The served model's id (or the name it was started with); another is a 404, as the OpenAI API answers."""
        if name is not None and name not in (self.model_name, *self.aliases):
            raise HTTPException(
                404,
                f"no model {name!r} here; this server serves {self.model_name!r}",
                headers={"x-error-code": "model_not_found"},
            )

    async def acquire(self) -> None:
        """A decoding slot, waiting on the event loop: 429 when ``max_concurrent + max_queue`` requests already hold
        or wait for one (counted from admission to :meth:`give_back`, so a waiter handed a freed slot is never
        counted twice), 503 when none frees within ``queue_timeout_s``."""
        if self.admitted >= self.max_concurrent + self.max_queue:
            raise HTTPException(429, f"server busy: {self.max_queue} requests already waiting; retry later")
        self.admitted += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            self.admitted -= 1
            raise HTTPException(503, f"no decoding slot within {self.queue_timeout_s} s") from None
        except BaseException:
            self.admitted -= 1
            raise

    def give_back(self) -> None:
        """A slot back (on the event loop)."""
        self.admitted -= 1
        self.slots.release()

    def run(self, body, prompt_ids: list[int], cancel: threading.Event):
        """``(piece, finish, step)`` for one request (the caller holds a slot); ``step`` is None for the text held
        back until the end (an incomplete character, a possible stop string's head), which is no token of its own."""
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        policy = body.augment or self.default_policy
        deadline = None if body.deadline_ms is None else body.deadline_ms / 1000
        info: dict = {}
        t0 = time.monotonic()
        out, first = TextStream(self.tokenizer, stops), True
        for step in self.engine.stream(
            prompt_ids,
            body.max_tokens,
            policy=policy,
            deadline_s=deadline,
            temperature=body.temperature,
            top_p=body.top_p,
            stop_ids=(self.eos,) if self.eos is not None else (),
            seed=body.seed,
            cancel=cancel,
            info=info,
        ):
            if first:
                self.m["ttft"].labels(policy).observe(time.monotonic() - t0)
                first = False
            piece, stopped = out.push(step.token, end=step.token == self.eos)
            if stopped:
                yield piece, "stop", step
                break
            yield piece, ("stop" if step.token == self.eos else None), step
        else:
            rest = out.flush()
            if rest:
                yield rest, None, None
        if info.get("outcome"):  # this request's own outcome (not a diff of counters other requests move too)
            self.m["augment"].labels(info["outcome"]).inc()

    async def complete(self, body, prompt_ids: list[int], endpoint: str, chat: bool, request: Request):
        """A completion (chat or not): checked, admitted to a decoding slot, then streamed or answered whole."""
        self.check_model(body.model)
        policy = body.augment or self.default_policy
        if get_policy(policy).needs_gate and not self.engine.has_gate:
            raise HTTPException(
                400,
                f"augment {policy!r} needs a coprocessor with a gate: fit "
                "one with `cacheaug train-gate --checkpoint CKPT --data ...` and serve that checkpoint",
            )
        loop = asyncio.get_running_loop()
        await self.acquire()
        if await request.is_disconnected():  # the client left while queued: no prefill, no decoding for it
            self.give_back()
            self.m["requests"].labels(endpoint, policy, "cancelled").inc()
            raise HTTPException(499, "the client closed the request")
        call = _Call(
            body,
            prompt_ids,
            endpoint,
            chat,
            policy,
            self.model_name,
            loop,
            release=partial(loop.call_soon_threadsafe, self.give_back),  # from the decoding thread, once
        )
        return self._stream(call) if body.stream else await self._whole(call, request)

    def _stream(self, call: _Call) -> StreamingResponse:
        """Server-sent events, one per piece of text, as the decoding thread yields them."""
        queue: asyncio.Queue = asyncio.Queue()
        put = partial(call.loop.call_soon_threadsafe, queue.put_nowait)

        def produce():
            try:
                for piece, finish, step in self.run(call.body, call.prompt_ids, call.cancel):
                    put(("piece" if step else "rest", piece, finish))
                put(("end", None, None))
            except Exception as err:  # surfaced to the client as an SSE error event
                put(("error", str(err), None))
            finally:
                call.release()

        try:
            self.decoders.submit(produce)
        except BaseException:
            self.give_back()
            raise

        async def events():
            finish, n_tokens, done = None, 0, False
            try:
                while True:
                    kind, piece, fin = await queue.get()
                    if kind in ("piece", "rest"):
                        finish = fin or finish
                        n_tokens += kind == "piece"
                        yield f"data: {json.dumps(call.envelope(piece, None))}\n\n"  # the reason: in the last chunk
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': piece}})}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(call.envelope('', finish or 'length'))}\n\n"
                        options = call.body.stream_options
                        if options is not None and options.include_usage:
                            last = {**call.envelope("", None), "choices": [], "usage": call.usage(n_tokens)}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                yield "data: [DONE]\n\n"
                done = True
                self.m["requests"].labels(call.endpoint, call.policy, "200").inc()
            finally:  # the client went away (the response task is cancelled): stop decoding for it
                if not done:
                    call.cancel.set()
                    self.m["requests"].labels(call.endpoint, call.policy, "cancelled").inc()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _whole(self, call: _Call, request: Request) -> JSONResponse:
        """One JSON answer once decoding ends; a client that disconnects (or times out) meanwhile cancels it."""

        def whole():
            try:
                pieces, finish, last, n = [], "length", None, 0
                for piece, fin, step in self.run(call.body, call.prompt_ids, call.cancel):
                    pieces.append(piece)
                    if step is not None:
                        last, n = step, n + 1
                    if fin:
                        finish = fin
                return "".join(pieces), finish, last, n
            finally:
                call.release()

        try:
            job = asyncio.wrap_future(self.decoders.submit(whole))
        except BaseException:
            self.give_back()
            raise
        while True:
            done, _ = await asyncio.wait({job}, timeout=0.05)
            if done:
                break
            if not call.cancel.is_set() and await request.is_disconnected():
                call.cancel.set()
                self.m["requests"].labels(call.endpoint, call.policy, "cancelled").inc()
        text, finish, last, n_tokens = job.result()
        if call.cancel.is_set():
            raise HTTPException(499, "the client closed the request")  # nobody reads it; logged as such
        self.m["requests"].labels(call.endpoint, call.policy, "200").inc()
        aug = {
            "policy": call.policy,
            "augmented": bool(last and last.augmented),
            "inserted_after": last.inserted_after if last else None,
        }
        return JSONResponse(call.envelope(text, finish, {"usage": call.usage(n_tokens), "augmentation": aug}))

    # ------------------------------------------------------------------------------------------------ endpoints
    async def completions(self, body: CompletionRequest, request: Request):
        with self.m["latency"].labels("completions").time():
            ids = await asyncio.get_running_loop().run_in_executor(None, self.encode, body.prompt, body.max_tokens)
            return await self.complete(body, ids, "completions", chat=False, request=request)

    async def chat_completions(self, body: ChatRequest, request: Request):
        with self.m["latency"].labels("chat").time():
            if body.max_completion_tokens is not None:  # the newer OpenAI name of max_tokens
                body.max_tokens = body.max_completion_tokens
            text, templated = self.chat_text(body.messages)
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(None, self.encode, text, body.max_tokens, templated)
            return await self.complete(body, ids, "chat", chat=True, request=request)

    async def augment(self, body: AugmentRequest):
        engine = self.engine
        if not engine.can_augment:
            raise HTTPException(
                400,
                "this server has no coprocessor, so it cannot augment a prefix: start it with "
                "`cacheaug serve --coprocessor CHECKPOINT`",
            )
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, self.encode, body.prompt, 0)
        deadline = None if body.deadline_ms is None else body.deadline_ms / 1000
        await self.acquire()
        try:
            cache_id = await loop.run_in_executor(
                self.decoders, partial(engine.augment_prefix, ids, deadline_s=deadline)
            )
        except (FloatingPointError, TimeoutError) as err:
            raise HTTPException(503, str(err)) from None
        except OSError as err:  # disk full, a read-only store: nothing stored, the server keeps serving
            log.warning("cacheaug serve: the prefix store could not be written: %s", err)
            raise HTTPException(
                507,
                f"the prefix store could not be written ({err.strerror or err}); nothing was "
                "stored and the server keeps serving: free space in --store-dir or make it writable",
            ) from None
        finally:
            self.give_back()
        return {"cache_id": cache_id, "tokens": len(ids)}

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "cacheaug"}

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model_info(self, name: str):
        self.check_model(name)
        return self._model_card()

    async def health(self):
        engine, slab = self.engine, self.engine.slab
        decoding = {
            "static_batch": slab is not None,
            "cuda_graphs": bool(slab and slab.cuda_graphs),
            "compiled": slab.compile if slab else None,
            "steps": slab.steps if slab else 0,
        }
        return {
            "status": "ok",
            "model": self.model_name,
            "coprocessor": engine.can_augment,
            "stored_prefixes": len(engine.store),
            "decoding": decoding,
            "coprocessor_priority": engine.config.coprocessor_priority,
            "coprocessor_graphs": engine.config.coprocessor_graphs,
        }

    async def metrics(self):
        from prometheus_client import generate_latest

        m, engine = self.m, self.engine
        m["store_bytes"].set(engine.store.bytes)
        m["store_entries"].set(len(engine.store))
        m["store_hits"].set(engine.stats.store_hits)
        return PlainTextResponse(generate_latest(self.registry).decode(), media_type="text/plain; version=0.0.4")

    async def invalid(self, request: Request, exc: RequestValidationError):
        self.m["requests"].labels(request.url.path, "-", "422").inc()
        return JSONResponse({"error": {"message": _validation_message(exc), "code": 422}}, status_code=422)

    async def http_error(self, request: Request, exc: StarletteHTTPException):  # FastAPI's, and the router's 404/405
        self.m["requests"].labels(request.url.path, "-", str(exc.status_code)).inc()
        code = (exc.headers or {}).get("x-error-code", exc.status_code)
        return JSONResponse({"error": {"message": exc.detail, "code": code}}, status_code=exc.status_code)


def create_app(
    engine: Engine,
    tokenizer,
    *,
    model_name: str = "cacheaug",
    aliases: tuple[str, ...] = (),
    default_policy: str = "sync",
    max_concurrent: int = 8,
    max_queue: int = 16,
    queue_timeout_s: float = 60.0,
    max_body_bytes: int = 4 << 20,
) -> FastAPI:
    """The OpenAI-compatible HTTP app over ``engine``: each endpoint is a method of one :class:`_Service`."""
    app = FastAPI(title="cacheaug", version="1")
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    svc = _Service(
        engine,
        tokenizer,
        model_name=model_name,
        aliases=aliases,
        default_policy=default_policy,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
    )
    app.post("/v1/completions")(svc.completions)
    app.post("/v1/chat/completions")(svc.chat_completions)
    app.post("/v1/augment")(svc.augment)
    app.get("/v1/models")(svc.models)
    app.get("/v1/models/{name:path}")(svc.model_info)
    app.get("/health")(svc.health)
    app.get("/metrics")(svc.metrics)
    app.exception_handler(RequestValidationError)(svc.invalid)
    app.exception_handler(StarletteHTTPException)(svc.http_error)
    return app


class _BodyLimit:
    """ASGI middleware: the request body is read here, up to ``max_bytes`` (declared by Content-Length or streamed in
    chunks); over it the answer is 413 before the app sees anything, else the app gets the body as one message."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._too_large(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later messages (a disconnect) come from the server

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.max_bytes} bytes", "code": 413}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
