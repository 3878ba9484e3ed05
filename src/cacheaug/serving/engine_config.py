"""The serving engine's options, checked once (:class:`EngineConfig`); apart from the engine so that policies can
name them without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass

STREAM_PRIORITIES = {"normal": 0, "high": -1}  # the coprocessor stream's CUDA priority (engine option)


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`~cacheaug.serving.Engine` decodes and how long it waits for the coprocessor (each field is
    described on the engine). ``cacheaug serve`` builds one from its flags (``--deadline-ms`` ->
    ``default_deadline_s``, ...); ``Engine(model, store, config, **fields)`` takes one, keyword fields overriding it.
    """

    default_deadline_s: float = 2.0
    hard_timeout_s: float = 30.0
    async_grace_s: float = 0.0
    max_stale_tokens: int = 64
    max_batch: int = 16
    static_batch: bool = True
    static_max_len: int = 8192
    compile_decode: str | None = None
    coprocessor_priority: str = "normal"
    coprocessor_graphs: bool = False

    def __post_init__(self):
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = (
            ("default_deadline_s", "at least 0", self.default_deadline_s >= 0),
            ("hard_timeout_s", "above 0", self.hard_timeout_s > 0),
            ("async_grace_s", "at least 0", self.async_grace_s >= 0),
            ("max_stale_tokens", "a non-negative integer", whole(self.max_stale_tokens) and self.max_stale_tokens >= 0),
            ("max_batch", "an integer of at least 1", whole(self.max_batch) and self.max_batch >= 1),
            ("static_max_len", "an integer of at least 1", whole(self.static_max_len) and self.static_max_len >= 1),
            (
                "coprocessor_priority",
                f"one of {', '.join(STREAM_PRIORITIES)}",
                self.coprocessor_priority in STREAM_PRIORITIES,
            ),
        )
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, rule, ok in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))
