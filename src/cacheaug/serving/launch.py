"""``cacheaug serve``: the model and coprocessor loaded, the engine built from one :class:`EngineConfig`, the HTTP app
(:mod:`cacheaug.serving.server`) served by uvicorn on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

from pathlib import Path

from .engine import Engine
from .engine_config import EngineConfig
from .policies import get_policy
from .server import create_app


def served_id(model: str) -> str:
    """The id a server announces for ``model``: a local folder's name (not its absolute path), else the name given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


_ENGINE_FLAGS = {  # serve's flags for EngineConfig's fields
    "--deadline-ms": "default_deadline_s",
    "--async-grace-ms": "async_grace_s",
    "--max-stale-tokens": "max_stale_tokens",
    "--hard-timeout-ms": "hard_timeout_s",
    "--coprocessor-priority": "coprocessor_priority",
}


def serve(
    model: str = "gemma-3-270m",
    coprocessor: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: str = "sync",
    store_dir: str | None = None,
    store_bytes: int = 1 << 30,
    store_disk_bytes: int = 10 << 30,
    max_concurrent: int = 8,
    max_queue: int = 16,
    deadline_ms: int = 2000,
    async_grace_ms: int = 0,
    max_stale_tokens: int = 64,
    hard_timeout_ms: int = 30_000,
    device: str | None = None,
    compile_decode: str | None = None,
    coprocessor_priority: str = "normal",
    coprocessor_graphs: bool = False,
    shutdown_grace_s: float = 10.0,
) -> None:
    """Load the model (and coprocessor) and serve until interrupted."""
    import uvicorn

    problems = [
        f"{name} must be {rule}, got {value}"
        for name, value, rule, ok in (
            ("--max-concurrent", max_concurrent, "at least 1", max_concurrent >= 1),
            ("--max-queue", max_queue, "at least 0", max_queue >= 0),
            ("--store-mib", store_bytes >> 20, "at least 0", store_bytes >= 0),
            ("--store-disk-mib", store_disk_bytes >> 20, "at least 0", store_disk_bytes >= 0),
            ("--port", port, "in 0..65535", 0 <= port <= 65535),
        )
        if not ok
    ]
    try:  # the engine's options, checked once by EngineConfig (flags in ms, fields in s)
        config = EngineConfig(
            default_deadline_s=deadline_ms / 1000,
            async_grace_s=async_grace_ms / 1000,
            max_stale_tokens=max_stale_tokens,
            hard_timeout_s=hard_timeout_ms / 1000,
            compile_decode=compile_decode,
            coprocessor_priority=coprocessor_priority,
            coprocessor_graphs=coprocessor_graphs,
        )
    except ValueError as err:
        message = str(err)
        for flag, name in _ENGINE_FLAGS.items():
            message = message.replace(f"{name} must", f"{flag} ({name}) must")
        problems.append(message)
    if problems:
        raise SystemExit("cacheaug serve: " + "; ".join(problems))

    from ..base import load_base_model
    from ..checkpoint import fingerprint
    from ..model import CacheAugmentedLM
    from .store import CacheStore

    base, tokenizer = load_base_model(model, device=device)
    if coprocessor:
        wrapped = CacheAugmentedLM.from_pretrained(coprocessor, base=base)
    else:
        wrapped = CacheAugmentedLM.frozen(base)  # no coprocessor: plain decoding whatever the policy
    if get_policy(policy).needs_gate and (not coprocessor or wrapped.gate is None):
        raise SystemExit(
            f"cacheaug serve: --policy {policy} needs a coprocessor with a gate: fit one with `cacheaug "
            "train-gate --checkpoint CKPT --data ...` and pass --coprocessor CKPT"
        )
    store = CacheStore(
        store_bytes,
        store_dir,
        fingerprint=f"{fingerprint(base)}:{fingerprint(wrapped.coprocessor) if coprocessor else 'none'}",
        max_disk_bytes=store_disk_bytes,
    )
    try:
        engine = Engine(wrapped, store, config)
    except ValueError as err:
        raise SystemExit(f"cacheaug serve: {err}") from None
    app = create_app(
        engine,
        tokenizer,
        model_name=served_id(model),
        aliases=(model,),
        default_policy=policy,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
    )
    # SIGTERM / Ctrl-C: stop accepting, give open requests (streams too) shutdown_grace_s to finish, then close them
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_grace_s)
    engine.close()
