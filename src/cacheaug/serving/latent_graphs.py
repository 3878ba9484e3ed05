"""The coprocessor call replayed as CUDA graphs (``Engine(coprocessor_graphs=True)``, ``cacheaug serve
--coprocessor-graphs``).

A coprocessor call launches several hundred kernels from Python (Gemma 3 270M: about 27 ms of launches on an H200,
the device's own work a small part of it). Beside the engine loop, which runs Python between its steps too, every
launch waits for the interpreter lock, and the call stretched to 136-496 ms (docs/performance.md, "Session 18"):
async latents arrived after their request had ended. Replayed as a CUDA graph, a call is a handful of Python
operations (copy the prefix into the graph's buffers, one replay) whatever the loop does.

One graph per prefix-length bucket (multiples of ``bucket`` positions): the prefix is copied into the first
``length`` positions of buffers shared by all buckets, and the positions after it are masked by the training pass's
rule (a trace at insertion point p = length-1 sees text keys <= p: cacheaug.masks), so the latents are
:meth:`CacheAugmentedLM.compute_latents`'s (tests/test_latent_graphs.py; without a GPU, or with ``capture=False``,
the same buffers and masks run eagerly).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..masks import attention_masks, trace_layout

ATTENTION = ("sdpa", "eager")  # backends whose masks are plain tensors built inside the graph (not flex's block masks)


@dataclass
class _Bucket:
    length: torch.Tensor  # [1, 1] the prefix length of the call being replayed
    last: torch.Tensor  # [1] its last token (echo_residual)
    run: object  # the call on the buffers (eager)
    graph: object = None  # its CUDA graph, once captured
    out: torch.Tensor | None = None  # the graph's output [1, N_L, D]


class LatentGraphs:
    """Latents of batch-1 prefixes of at most ``max_length`` positions, each call one CUDA graph replay (``capture``;
    default: on a GPU). A bucket's graph is captured at its first call. Calls must come from one thread at a time (the engine's coprocessor worker)."""

    def __init__(self, model, bucket: int = 256, max_length: int = 8192, capture: bool | None = None):
        if model.family.attn_implementation not in ATTENTION:
            raise ValueError(
                f"coprocessor graphs need sdpa or eager attention (masks built inside the graph), not "
                f"{model.family.attn_implementation}; serve without --coprocessor-graphs"
            )
        if bucket < 1 or max_length < bucket:
            raise ValueError(f"need 1 <= bucket <= max_length, got bucket={bucket}, max_length={max_length}")
        self.model, self.bucket = model, bucket
        self.max_length = -(-max_length // bucket) * bucket
        self.capture = model.device.type == "cuda" if capture is None else capture
        cfg, weight = model.base.config, model.base.get_input_embeddings().weight
        heads, dim = (
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        )
        shape = (1, heads, self.max_length, dim)
        self.layers = [
            (
                torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(shape, dtype=weight.dtype, device=weight.device),
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        self.buckets: dict[int, _Bucket] = {}
        self.calls = 0  # calls served, and how many of them were graph replays
        self.replays = 0
        self._pool = None
        self._lock = threading.Lock()

    def bucket_of(self, length: int) -> int:
        return -(-length // self.bucket) * self.bucket

    def fits(self, length: int) -> bool:
        return 1 <= length <= self.max_length

    def _build(self, S: int) -> _Bucket:
        m = self.model
        weight = m.base.get_input_embeddings().weight
        length = torch.ones(1, 1, dtype=torch.long, device=weight.device)
        last = torch.zeros(1, dtype=torch.long, device=weight.device)
        prefix = [(k[:, :, :S], v[:, :, :S]) for k, v in self.layers]
        cop, N_L = m.coprocessor, m.config.n_latents

        def run() -> torch.Tensor:
            layout = trace_layout(length - 1, S, N_L)  # one trace at p = length - 1 over S keys (the rest masked)
            masks = None if cop.backbone is None else attention_masks(layout, m.family, weight.dtype)
            echo = m.base.get_input_embeddings()(last)[:, None] if m.config.echo_residual else None
            return cop(prefix, 1, 1, layout.position_ids, masks, echo)  # [1, N_L, D]

        entry = _Bucket(length, last, run)
        if self.capture:
            side = torch.cuda.Stream(device=weight.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (lazy initialisation, kernel choice) outside the capture
                run()
            torch.cuda.current_stream().wait_stream(side)
            entry.graph = torch.cuda.CUDAGraph()
            # thread-local: the engine loop keeps decoding on its own thread (and stream) during a capture
            with torch.cuda.graph(entry.graph, pool=self._pool, capture_error_mode="thread_local"):
                entry.out = run()
            self._pool = entry.graph.pool()
        return entry

    def _bucket(self, S: int) -> _Bucket:
        entry = self.buckets.get(S)
        if entry is None:
            entry = self.buckets[S] = self._build(S)
        return entry

    @torch.no_grad()
    def __call__(self, layers: list, length: int, last_token: int | None = None) -> torch.Tensor:
        """The latents ``[1, N_L, D]`` of a prefix: ``layers`` holds one ``(keys, values)`` ``[1, H_kv, >= length,
        D_h]`` per layer, ``last_token`` the id at position ``length - 1`` (echo_residual)."""
        if not self.fits(length):
            raise ValueError(
                f"a prefix of {length} positions does not fit coprocessor graphs of at most "
                f"{self.max_length}: raise max_length, or call compute_latents"
            )
        if self.model.config.echo_residual and last_token is None:
            raise ValueError("This coprocessor (echo_residual) needs `last_token`, the id of the prefix's last token.")
        with self._lock:
            entry = self._bucket(self.bucket_of(length))
            dst = [t[:, :, :length] for pair in self.layers for t in pair]
            torch._foreach_copy_(dst, [t[:, :, :length] for pair in layers for t in pair])
            entry.length.fill_(length)
            entry.last.fill_(0 if last_token is None else int(last_token))
            self.calls += 1
            if entry.graph is None:
                return entry.run()
            entry.graph.replay()
            self.replays += 1
            return entry.out.clone()  # the next replay overwrites the graph's output
