"""The options of ``cacheaug serve`` (a dataclass like those of cacheaug.frontends: each field a command-line option,
validated in ``__post_init__``; ``run()`` starts the server)."""

from __future__ import annotations

from dataclasses import dataclass

from ..frontends import _Checked, _checkpoints, _f


def _policy_names() -> tuple[str, ...]:
    from .policies import policy_names

    return policy_names()


@dataclass(frozen=True)
class ServeConfig(_Checked):
    """``cacheaug serve``: the OpenAI-compatible HTTP server with cache augmentation."""

    model: str = _f("gemma-3-270m", "the frozen decoder")
    coprocessor: str | None = _f(None, "coprocessor checkpoint or run folder (none: plain decoding)")
    host: str = _f("127.0.0.1", "bind address (0.0.0.0 exposes the server to the network)")
    port: int = _f(8000, "port")
    policy: str = _f(
        "sync",
        "default augmentation policy (cacheaug.serving.policies; more with CACHEAUG_PLUGINS)",
        choices=_policy_names,
    )
    deadline_ms: int = _f(2000, "default wait for the latents", min=0)
    async_grace_ms: int = _f(0, "async: how long the first token may wait for the latents", min=0)
    max_stale_tokens: int = _f(
        64,
        "async: take latents that arrive after decoding began up to this many tokens "
        "late; they go in at their true place and those tokens are replayed (0: only latents "
        "ready before the first token, within --async-grace-ms)",
        min=0,
    )
    store_dir: str | None = _f(None, "persist augmented prefixes here (safetensors)")
    store_mib: int = _f(1024, "memory budget of the prefix store", min=0)
    store_disk_mib: int = _f(10240, "disk budget of --store-dir (least recently used files are deleted past it)", min=0)
    hard_timeout_ms: int = _f(30000, "a coprocessor call running longer is abandoned and its worker replaced", min=1)
    shutdown_grace_s: float = _f(
        10.0, "on SIGTERM / Ctrl-C, open requests get this long to finish, then the server closes them and exits", min=0
    )
    max_concurrent: int = _f(8, "requests decoding at once (their steps are batched)", min=1)
    max_queue: int = _f(16, "requests waiting before 429", min=0)
    device: str | None = _f(None, "cuda / cpu (default: cuda if available)")
    compile_decode: str | None = _f(
        None,
        "torch.compile the batched decoding step with this backend before its CUDA "
        "graphs are recorded (inductor: faster decoding steps, figures in docs/performance.md; "
        "the first batch shape compiles for tens of seconds, the next with symbolic sizes "
        "once for minutes, then every shape reuses it)",
        choices=lambda: ("inductor", "aot_eager"),
    )
    coprocessor_priority: str = _f(
        "normal",
        "CUDA priority of the coprocessor's stream: high lets its kernels go "
        "before the decoding steps' (measured: no help, the call's time is its kernel "
        "launches; docs/performance.md)",
        choices=lambda: ("normal", "high"),
    )
    coprocessor_graphs: bool = _f(
        False,
        "run each prompt's coprocessor call as one CUDA graph replay (a graph per "
        "256-token bucket, captured at its first use): beside the decoding loop the eager "
        "call's kernel launches wait for the interpreter and async latents arrive late "
        "(docs/performance.md); same latents",
    )

    def _problems(self) -> list[str]:
        from .policies import get_policy

        problems = [] if 0 <= self.port <= 65535 else [f"--port must be in 0..65535, got {self.port}"]
        try:
            get_policy(self.policy)
        except ValueError as err:
            problems.append(f"--policy: {err}")
        return problems

    def run(self) -> None:
        from .launch import serve

        coprocessor = _checkpoints((self.coprocessor,))[0] if self.coprocessor else None
        serve(
            self.model,
            coprocessor,
            host=self.host,
            port=self.port,
            policy=self.policy,
            store_dir=self.store_dir,
            store_bytes=self.store_mib << 20,
            store_disk_bytes=self.store_disk_mib << 20,
            max_concurrent=self.max_concurrent,
            max_queue=self.max_queue,
            deadline_ms=self.deadline_ms,
            async_grace_ms=self.async_grace_ms,
            max_stale_tokens=self.max_stale_tokens,
            hard_timeout_ms=self.hard_timeout_ms,
            device=self.device,
            compile_decode=self.compile_decode,
            coprocessor_priority=self.coprocessor_priority,
            coprocessor_graphs=self.coprocessor_graphs,
            shutdown_grace_s=self.shutdown_grace_s,
        )
