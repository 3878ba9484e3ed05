"""Store of augmented caches for shared prefixes: in-memory LRU under a byte budget, written through to disk.

An entry is the decoder cache of a prefix followed by its latents, plus the next-token logits after them,
keyed by a hash of (model fingerprint, prefix token ids). With a directory every entry is also written there
as safetensors (atomically), so nothing stored is lost on restart; the memory budget only decides what stays
resident. Without a directory, entries evicted from memory are gone. ``max_disk_bytes`` bounds the directory:
past it the least recently used files are deleted (those entries are computed afresh when next needed).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .. import atomic
from ..kv import from_layers


class CacheStore:
    def __init__(
        self,
        max_bytes: int = 1 << 30,
        directory: str | Path | None = None,
        fingerprint: str = "",
        max_disk_bytes: int | None = None,
    ):
        if max_bytes < 0 or (max_disk_bytes is not None and max_disk_bytes < 0):
            raise ValueError(f"store budgets must be >= 0, got {max_bytes} (memory) and {max_disk_bytes} (disk)")
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self._disk: OrderedDict[str, int] = OrderedDict()  # id -> file size, least recently used first
        self.directory = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self._mem: OrderedDict[str, tuple[dict, int, int]] = OrderedDict()  # id -> (tensors, n_tokens, bytes)
        self._index: dict[str, int] = {}  # every known id -> prefix length
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            files = sorted(self.directory.glob("*.safetensors"), key=lambda q: q.stat().st_mtime)
            for path in files:
                try:  # one bad file costs its entry (recomputed on demand), never the server's start
                    with safe_open(str(path), "pt") as f:
                        meta = f.metadata() or {}
                    n_tokens = int(meta["n_tokens"]) if isinstance(meta.get("n_tokens"), str) else None
                except Exception as err:  # noqa: BLE001 (truncated, empty, garbage, a folder: all skipped)
                    warnings.warn(
                        f"cacheaug store: skipping unreadable {path.name} ({type(err).__name__}: {err})", stacklevel=2
                    )
                    continue
                if meta.get("fingerprint") == fingerprint and n_tokens is not None and n_tokens > 0:
                    self._index[path.stem] = n_tokens
                    self._disk[path.stem] = path.stat().st_size
            with self._lock:
                self._trim_disk()

    def key(self, tokens: list[int]) -> str:
        blob = f"{self.fingerprint}:{','.join(map(str, tokens))}".encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def __contains__(self, cache_id: str) -> bool:
        return cache_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def put(self, tokens: list[int], cache: DynamicCache, logits: torch.Tensor) -> str:
        cache_id = self.key(tokens)
        tensors = {"logits": logits.detach().cpu().contiguous()}
        for i, layer in enumerate(cache.layers):
            tensors[f"k.{i}"] = layer.keys.detach().cpu().contiguous()
            tensors[f"v.{i}"] = layer.values.detach().cpu().contiguous()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.directory:
            path = self.directory / f"{cache_id}.safetensors"
            meta = {"n_tokens": str(len(tokens)), "fingerprint": self.fingerprint}
            self.directory.mkdir(parents=True, exist_ok=True)  # deleted while serving: made again
            atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # OSError: nothing stored
        with self._lock:
            self._index[cache_id] = len(tokens)
            self._remember(cache_id, tensors, len(tokens), size)
            if self.directory:
                self._disk.pop(cache_id, None)
                self._disk[cache_id] = path.stat().st_size
                self._trim_disk(keep=cache_id)
        return cache_id

    @property
    def disk_bytes(self) -> int:
        return sum(self._disk.values())

    def _trim_disk(self, keep: str | None = None) -> None:
        """Delete least recently used files until the directory is within ``max_disk_bytes`` (caller holds the
        lock); the newest entry (``keep``) stays even if it alone is over the budget."""
        if self.max_disk_bytes is None:
            return
        while self.disk_bytes > self.max_disk_bytes and len(self._disk) > (keep is not None):
            old = next(iter(self._disk))
            if old == keep:
                self._disk.move_to_end(old)
                old = next(iter(self._disk))
            self._disk.pop(old)
            self._index.pop(old, None)
            if old in self._mem:
                self.bytes -= self._mem.pop(old)[2]
            (self.directory / f"{old}.safetensors").unlink(missing_ok=True)
            self.evictions += 1

    def _remember(self, cache_id: str, tensors: dict, n: int, size: int) -> None:
        if cache_id in self._mem:
            self.bytes -= self._mem.pop(cache_id)[2]
        self._mem[cache_id] = (tensors, n, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._mem) > 1:
            old, (_, _, old_size) = self._mem.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
            if self.directory is None:
                self._index.pop(old, None)

    def longest_prefix(self, tokens: list[int]) -> str | None:
        """Id of the longest stored prefix of ``tokens``, or None."""
        for n in sorted(set(self._index.values()), reverse=True):
            if n <= len(tokens):
                cache_id = self.key(tokens[:n])
                if cache_id in self._index:
                    return cache_id
        return None

    def discard(self, cache_id: str) -> None:
        """Forget an entry (and delete its file): it will be computed afresh."""
        with self._lock:
            self._index.pop(cache_id, None)
            self._disk.pop(cache_id, None)
            if cache_id in self._mem:
                self.bytes -= self._mem.pop(cache_id)[2]
        if self.directory:
            (self.directory / f"{cache_id}.safetensors").unlink(missing_ok=True)

    def load(
        self, cache_id: str, device, *, n_layers: int | None = None, n_latents: int | None = None
    ) -> tuple[DynamicCache, torch.Tensor, int]:
        """A fresh cache (prefix + latents), the logits after it, and the prefix length. An entry that cannot be read,
        has the wrong layers or lengths (``n_layers``, ``n_latents``) or holds non-finite values is discarded
        with a warning and KeyError is raised, so the caller computes the prefix afresh."""
        with self._lock:
            if cache_id not in self._index:
                raise KeyError(cache_id)
            n = self._index[cache_id]
            if cache_id in self._disk:
                self._disk.move_to_end(cache_id)
            if cache_id in self._mem:  # put by this process (Engine.augment_prefix checks the latents) or checked below
                self._mem.move_to_end(cache_id)
                tensors, problem = self._mem[cache_id][0], None
            else:
                try:
                    with safe_open(str(self.directory / f"{cache_id}.safetensors"), "pt") as f:
                        tensors = {k: f.get_tensor(k) for k in f.keys()}
                    problem = self._problem(tensors, n, n_layers, n_latents)
                except Exception as err:  # noqa: BLE001
                    problem = f"unreadable: {type(err).__name__}: {err}"
                if problem is None:
                    self._remember(cache_id, tensors, n, sum(t.numel() * t.element_size() for t in tensors.values()))
        if problem:
            warnings.warn(
                f"cacheaug store: discarding entry {cache_id} ({problem}); it will be recomputed", stacklevel=2
            )
            self.discard(cache_id)
            raise KeyError(cache_id)
        layers = sum(1 for k in tensors if k.startswith("k."))
        kv = [(tensors[f"k.{i}"].to(device), tensors[f"v.{i}"].to(device)) for i in range(layers)]
        return from_layers(kv), tensors["logits"].to(device), n

    @staticmethod
    def _problem(tensors: dict, n: int, n_layers: int | None, n_latents: int | None) -> str | None:
        layers = sum(1 for k in tensors if k.startswith("k."))
        if "logits" not in tensors or layers == 0 or (n_layers is not None and layers != n_layers):
            return f"{layers} layers, expected {n_layers}"
        for i in range(layers):
            k, v = tensors.get(f"k.{i}"), tensors.get(f"v.{i}")
            if k is None or v is None or k.dim() != 4 or k.shape != v.shape:
                return f"layer {i} missing or mis-shaped"
            if n_latents is not None and k.shape[2] != n + n_latents:
                return f"layer {i} holds {k.shape[2]} positions, expected {n + n_latents}"
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            return "non-finite values"
        return None
