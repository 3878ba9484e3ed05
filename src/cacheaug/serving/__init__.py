"""Serving: an engine that never makes the decoder wait, a store of augmented prefixes, an HTTP server."""

from .engine import Engine, Step
from .engine_config import EngineConfig
from .store import CacheStore

__all__ = ["CacheStore", "Engine", "EngineConfig", "Step"]
