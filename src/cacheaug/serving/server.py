"""HTTP server: OpenAI-compatible completions over the :class:`~cacheaug.serving.engine.Engine`.

    cacheaug serve --model gemma-3-270m --coprocessor ckpt/          # binds 127.0.0.1:8000 unless told otherwise

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with SSE when ``stream``),
``POST /v1/augment`` (store the augmented cache of a shared prefix; later prompts starting with it reuse it),
``GET /health``, ``GET /metrics`` (Prometheus). Request fields beyond OpenAI's: ``augment`` (``off`` | ``sync`` |
``async``, default from the server) and ``deadline_ms``. Bodies are validated (422/400 with the reason); at most
``max_concurrent`` requests decode at once and at most ``max_queue`` wait, beyond that 429; a request that
cannot start within ``queue_timeout_s`` gets 503. Nothing in a request is executed or unpickled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from .engine import Engine


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints (OpenAI's, plus ``augment`` and ``deadline_ms``)."""

    model: str | None = None
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: list[str] | str | None = None
    seed: int | None = None
    augment: Literal["off", "sync", "async"] | None = None
    deadline_ms: int | None = Field(default=None, ge=0, le=600_000)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class AugmentRequest(BaseModel):
    prompt: str = Field(min_length=1)


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


def create_app(engine: Engine, tokenizer, *, model_name: str = "cacheaug", default_policy: str = "sync",
               max_concurrent: int = 8, max_queue: int = 16, queue_timeout_s: float = 60.0) -> FastAPI:
    app = FastAPI(title="cacheaug", version="1")
    registry, m = _metrics()
    slots = threading.BoundedSemaphore(max_concurrent)
    waiting = {"n": 0}
    waiting_lock = threading.Lock()
    max_context = getattr(engine.base.config, "max_position_embeddings", None)
    n_latents = engine.model.config.n_latents
    eos = tokenizer.eos_token_id

    def encode(text: str, max_tokens: int) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        if max_context is not None and len(ids) + n_latents + max_tokens > max_context:
            raise HTTPException(400, f"prompt of {len(ids)} tokens + {max_tokens} new tokens + {n_latents} latents "
                                     f"exceeds the model's context of {max_context}")
        return ids

    def chat_text(messages: list[ChatMessage]) -> str:
        msgs = [msg.model_dump() for msg in messages]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{msg['role']}: {msg['content']}\n" for msg in msgs) + "assistant:"

    def acquire() -> None:
        with waiting_lock:
            if waiting["n"] >= max_queue:
                raise HTTPException(429, f"server busy: {max_queue} requests already waiting; retry later")
            waiting["n"] += 1
        try:
            if not slots.acquire(timeout=queue_timeout_s):
                raise HTTPException(503, f"no decoding slot within {queue_timeout_s} s")
        finally:
            with waiting_lock:
                waiting["n"] -= 1

    def run(body, prompt_ids: list[int]):
        """Token stream for one request (the caller holds a slot)."""
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        policy = body.augment or default_policy
        deadline = None if body.deadline_ms is None else body.deadline_ms / 1000
        before = (engine.stats.augmented, engine.stats.late, engine.stats.failed)
        t0 = time.monotonic()
        text, first, ids = "", True, []
        for step in engine.stream(prompt_ids, body.max_tokens, policy=policy, deadline_s=deadline,
                                  temperature=body.temperature, top_p=body.top_p, stop_ids=(eos,) if eos is not None else (),
                                  seed=body.seed):
            if first:
                m["ttft"].labels(policy).observe(time.monotonic() - t0)
                first = False
            ids.append(step.token)
            # decode the whole continuation and emit the difference: single-token decodes lose spaces
            piece = tokenizer.decode(ids, skip_special_tokens=True)[len(text):]
            cut = _stop_at(text + piece, stops)
            if cut is not None:
                yield cut[len(text):], "stop", step
                break
            text += piece
            yield piece, ("stop" if step.token == eos else None), step
        for outcome, a, b in zip(("augmented", "late", "failed"), before,
                                 (engine.stats.augmented, engine.stats.late, engine.stats.failed)):
            if b > a:
                m["augment"].labels(outcome).inc(b - a)

    async def complete(body, prompt_ids: list[int], endpoint: str, chat: bool):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, acquire)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        policy = body.augment or default_policy

        def envelope(text: str, finish, extra: dict | None = None) -> dict:
            if chat:
                choice = {"index": 0, "delta" if body.stream else "message": {"role": "assistant", "content": text},
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": body.model or model_name, "choices": [choice], **(extra or {})}

        if body.stream:
            queue: asyncio.Queue = asyncio.Queue()

            def produce():
                try:
                    for piece, finish, _ in run(body, prompt_ids):
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece, finish))
                    loop.call_soon_threadsafe(queue.put_nowait, ("end", None, None))
                except Exception as err:  # surfaced to the client as an SSE error event
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", str(err), None))
                finally:
                    slots.release()

            threading.Thread(target=produce, daemon=True).start()

            async def events():
                finish = None
                while True:
                    kind, piece, fin = await queue.get()
                    if kind == "piece":
                        finish = fin or finish
                        yield f"data: {json.dumps(envelope(piece, fin))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': piece}})}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(envelope('', finish or 'length'))}\n\n"
                        break
                yield "data: [DONE]\n\n"
                m["requests"].labels(endpoint, policy, "200").inc()

            return StreamingResponse(events(), media_type="text/event-stream")

        def whole():
            try:
                pieces, finish, last, n = [], "length", None, 0
                for piece, fin, step in run(body, prompt_ids):
                    pieces.append(piece)
                    last, n = step, n + 1
                    if fin:
                        finish = fin
                return "".join(pieces), finish, last, n
            finally:
                slots.release()

        text, finish, last, n_tokens = await loop.run_in_executor(None, whole)
        m["requests"].labels(endpoint, policy, "200").inc()
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_tokens}
        aug = {"policy": policy, "augmented": bool(last and last.augmented),
               "inserted_after": last.inserted_after if last else None}
        return JSONResponse(envelope(text, finish, {"usage": usage, "augmentation": aug}))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        with m["latency"].labels("completions").time():
            return await complete(body, encode(body.prompt, body.max_tokens), "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        with m["latency"].labels("chat").time():
            return await complete(body, encode(chat_text(body.messages), body.max_tokens), "chat", chat=True)

    @app.post("/v1/augment")
    async def augment(body: AugmentRequest):
        ids = encode(body.prompt, 0)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, acquire)
        try:
            cache_id = await loop.run_in_executor(None, engine.augment_prefix, ids)
        finally:
            slots.release()
        return {"cache_id": cache_id, "tokens": len(ids)}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "coprocessor": engine.model.enabled,
                "stored_prefixes": len(engine.store)}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import generate_latest

        m["store_bytes"].set(engine.store.bytes)
        m["store_entries"].set(len(engine.store))
        m["store_hits"].set(engine.stats.store_hits)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        m["requests"].labels(request.url.path, "-", str(exc.status_code)).inc()
        return JSONResponse({"error": {"message": exc.detail, "code": exc.status_code}}, status_code=exc.status_code)

    return app


def _stop_at(text: str, stops: list[str]) -> str | None:
    """``text`` cut before the first stop string, or None if none occurs."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def serve(model: str = "gemma-3-270m", coprocessor: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          policy: str = "sync", store_dir: str | None = None, store_bytes: int = 1 << 30, max_concurrent: int = 8,
          max_queue: int = 16, deadline_ms: int = 2000, async_grace_ms: int = 0, max_stale_tokens: int = 64,
          device: str | None = None) -> None:
    """Load the model (and coprocessor) and serve until interrupted."""
    import uvicorn

    from ..base import load_base_model
    from ..checkpoint import fingerprint
    from ..model import CacheAugmentedLM
    from .store import CacheStore

    base, tokenizer = load_base_model(model, device=device)
    if coprocessor:
        wrapped = CacheAugmentedLM.from_pretrained(coprocessor, base=base)
    else:
        from ..config import CoprocessorConfig

        wrapped = CacheAugmentedLM(base, CoprocessorConfig(init="pause"))
        wrapped.enabled = False  # no coprocessor: plain decoding whatever the policy
    store = CacheStore(store_bytes, store_dir, fingerprint=f"{fingerprint(base)}:{fingerprint(wrapped.coprocessor)}")
    engine = Engine(wrapped, store, default_deadline_s=deadline_ms / 1000, async_grace_s=async_grace_ms / 1000,
                    max_stale_tokens=max_stale_tokens)
    app = create_app(engine, tokenizer, model_name=model, default_policy=policy, max_concurrent=max_concurrent,
                     max_queue=max_queue)
    uvicorn.run(app, host=host, port=port, log_level="info")
