"""Static batched decoding: the caches of the decoding requests live in one preallocated slab per layer.

The engine loop gives each decoding request a row of the slab (keys and values ``[rows, H_kv, length, D_h]`` per
layer, allocated once and grown by doubling when a longer or a further request comes). A decoding step of any subset
of the rows then runs over fixed shapes: every row of the first ``B`` writes its new token's key and value at its
own position (rows that are not stepping write to a scratch position past their end), attends to the first ``S``
positions through a mask built inside the step from the rows' lengths, and nothing is re-padded, concatenated or
split. ``B`` and ``S`` are rounded up to powers of two, so a GPU records the step once per (``B``, ``S``) as a CUDA
graph and replays it: one launch per step instead of one per kernel.

The masks follow the library's one rule (:func:`cacheaug.masks.allowed`): the new token at cache index ``i`` sees
keys ``j <= i``, and on sliding-window layers only ``i - j < window``, exactly what transformers builds for a plain
``DynamicCache``, so a step here equals the unbatched step (tested against it for every family, sdpa and eager).

A request's ``cache`` while it holds a row is a view of the row (:meth:`Slab.view`); a cache that was replaced
(latents inserted and tokens replayed) is copied into the row again before its next step (:meth:`Slab.holds`).
"""

from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache

from .. import kv
from ..families import SLIDING
from ..masks import allowed


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


class _StepCache(DynamicCache):
    """What a slab step hands the decoder as its cache: each layer's update writes row b's new key and value at
    position ``write[b]`` of the slab and returns the first ``S`` positions of the first ``B`` rows."""

    def __init__(self, slab: "Slab", B: int, S: int, write: torch.Tensor):
        super().__init__()
        self.slab, self.B, self.S, self.write = slab, B, S, write

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.slab.keys[layer_idx][: self.B], self.slab.values[layer_idx][: self.B]
        index = self.write.view(-1, 1, 1, 1).expand(-1, keys.shape[1], 1, keys.shape[3])
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        return keys[:, :, : self.S], values[:, :, : self.S]

    def get_seq_length(self, *args, **kwargs) -> int:  # positions and masks are given explicitly
        return self.S - 1


class Slab:
    """Rows of preallocated cache for the decoding requests of one engine, and their batched decoding step.

    Args:
        model: the :class:`~cacheaug.model.CacheAugmentedLM` whose frozen decoder decodes.
        max_rows: rows at most (the engine's ``max_batch``).
        max_length: positions per row at most (prompt, latents and generated tokens); a longer request is decoded
            by the dynamic path instead (:meth:`fits`).
        cuda_graphs: record and replay each step shape as a CUDA graph (default: on CUDA devices).
        compile: ``torch.compile`` the step with this backend (e.g. ``"inductor"``: fused kernels) before recording it;
            the first shape compiles for itself, the next with its sizes symbolic (serving every later shape): at
            most four compiles, tens of seconds to minutes each for a real model; off by default. Each (rows, keys) shape is
            still recorded as its own CUDA graph (milliseconds).
    """

    MIN_LENGTH = 64
    ATTENTION = ("sdpa", "eager")  # backends whose masks the step builds (not flex_attention's block masks)

    def __init__(
        self, model, max_rows: int, max_length: int = 8192, cuda_graphs: bool | None = None, compile: str | None = None
    ):
        family = model.family
        if family.attn_implementation not in self.ATTENTION:
            raise ValueError(
                f"static batched decoding needs sdpa or eager attention, not {family.attn_implementation!r}"
            )
        self.model, self.base, self.family = model, model.base, family
        self.max_rows, self.max_length = max(1, max_rows), max(self.MIN_LENGTH, max_length)
        self.device = model.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.keys: list[torch.Tensor] = []  # per layer [rows, H_kv, size, D_h]; position size - 1 is scratch
        self.values: list[torch.Tensor] = []
        self.rows, self.size = 0, 0
        self.length: list[int] = []  # entries held by each row
        self.free: list[int] = []  # rows not in use, lowest first
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # tokens, rotary positions, write positions (per row of the slab), and the stepping rows (in order)
        self.inputs = torch.zeros(4, self.max_rows, dtype=torch.long, device=self.device)
        self.host = torch.zeros(4, self.max_rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None  # host may be written again after
        self._step_fn = self._run
        self.compile = compile
        if compile:
            from ..speed import allow_recompiles

            allow_recompiles()
            # sizes symbolic (dynamic=True; 1 and equal sizes still specialise): a new (rows, keys) shape met while
            # serving reuses a compiled graph instead of compiling for tens of seconds while every request waits;
            # at most four compiles (one row or more; keys the slab's whole length or fewer), tests/test_slab.py
            self._step_fn = torch.compile(self._run, backend=compile, dynamic=True)
        self.steps = 0  # steps run, and caches copied in (a request's first, or a replaced one)
        self.adopted = 0

    # ----------------------------------------------------------------------------------------- rows
    def fits(self, total_length: int) -> bool:
        """Whether a request reaching ``total_length`` cache entries can hold a row."""
        return total_length < self.max_length  # one position of every row is scratch

    def _ensure(self, rows: int, length: int, like: kv.KV | None = None) -> None:
        """Grow the slab (by doubling, copying what it holds) to at least ``rows`` rows of ``length`` positions (the
        layers' shapes and dtype from ``like``, default the slab's own)."""
        like = like if like is not None else list(zip(self.keys, self.values))
        new_rows = min(self.max_rows, _pow2(rows)) if rows > self.rows else self.rows
        new_size = min(self.max_length, _pow2(length + 1, self.MIN_LENGTH)) if length + 1 > self.size else self.size
        if (new_rows, new_size) == (self.rows, self.size):
            return
        keys, values = [], []
        for layer, (k, v) in enumerate(like):
            shape = (new_rows, k.shape[1], new_size, k.shape[3])
            nk = torch.zeros(shape, dtype=k.dtype, device=self.device)
            nv = torch.zeros(shape, dtype=v.dtype, device=self.device)
            if self.rows:
                n = self.size - 1  # the scratch position is not kept
                nk[: self.rows, :, :n] = self.keys[layer][:, :, :n]
                nv[: self.rows, :, :n] = self.values[layer][:, :, :n]
            keys.append(nk)
            values.append(nv)
        self.keys, self.values = keys, values
        self.free += list(range(self.rows, new_rows))
        self.free.sort()
        self.length += [0] * (new_rows - self.rows)
        self.rows, self.size = new_rows, new_size
        self.graphs.clear()  # recorded against the old tensors
        self.pool = None  # with its graphs gone, their memory pool is released: the next graphs need a new one

    def adopt(self, cache: DynamicCache, row: int | None = None, reserve: int = 0) -> int:
        """Copy ``cache`` (batch 1) into ``row`` (default: the lowest free row) and return the row; with room for
        ``reserve`` more entries (the slab grows anyway when a row fills up, but each growth records new graphs)."""
        layers, n = kv.layers(cache), kv.length(cache)
        if not self.fits(n + 1):
            raise ValueError(f"a cache of {n} entries does not fit the slab (at most {self.max_length - 2})")
        room = min(n + 1 + max(0, reserve), self.max_length - 1)
        if row is None:
            if not self.free and self.rows >= self.max_rows:
                raise RuntimeError("every row of the slab is in use")
            self._ensure(self.rows + 1 if not self.free else self.rows, room, layers)
            row = self.free.pop(0)
        else:
            self._ensure(self.rows, room, layers)
        for layer, (k, v) in enumerate(layers):
            self.keys[layer][row, :, :n] = k[0]
            self.values[layer][row, :, :n] = v[0]
        self.length[row] = n
        self.adopted += 1
        return row

    def has_room(self) -> bool:
        return bool(self.free) or self.rows < self.max_rows

    def release(self, row: int) -> None:
        self.length[row] = 0
        self.free.append(row)
        self.free.sort()

    def view(self, row: int) -> DynamicCache:
        """The cache held by ``row``, as views (decoding into it with the dynamic path copies, as kv.fork does)."""
        n = self.length[row]
        return kv.from_layers(
            [(k[row : row + 1, :, :n], v[row : row + 1, :, :n]) for k, v in zip(self.keys, self.values)]
        )

    def holds(self, row: int, cache: DynamicCache) -> bool:
        """Whether ``cache`` is still ``row``'s own view (not replaced or appended to since it was taken)."""
        layers = kv.layers(cache)
        return (
            kv.length(cache) == self.length[row]
            and len(layers) == len(self.keys)
            and layers[0][0].data_ptr() == self.keys[0][row].data_ptr()
        )

    # ----------------------------------------------------------------------------------------- the step
    def _masks(self, write: torch.Tensor, S: int):
        """The step's masks: row b's new token (cache index ``write[b]``) against keys ``0..S-1``, ``[B, 1, 1, S]``."""
        q = write[:, None, None, None]
        kv_pos = torch.arange(S, device=write.device)[None, None, None, :]
        none = torch.full_like(q, -1)
        masks = {}
        for layer_type in self.family.mask_types:
            window = self.family.sliding_window if layer_type == SLIDING else None
            mask = allowed(q, none + 1, q, kv_pos, none, window)
            if self.family.attn_implementation == "eager":
                dtype = self.keys[0].dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                    ~mask, torch.finfo(dtype).min
                )
            masks[layer_type] = mask
        if self.family.dict_masks:
            return masks
        (only,) = masks.values()
        return only

    def _run(self, B: int, S: int) -> torch.Tensor:
        tokens, positions, write = self.inputs[0, :B], self.inputs[1, :B], self.inputs[2, :B]
        out = self.base(
            input_ids=tokens[:, None],
            position_ids=positions[:, None],
            attention_mask=self._masks(write, S),
            use_cache=True,
            logits_to_keep=1,
            **{self.family.cache_kwarg: _StepCache(self, B, S, write)},
        )
        return out.logits[:, -1]

    def _call(self, B: int, S: int) -> torch.Tensor:
        if not self.compile:
            return self._run(B, S)
        import torch.fx.experimental._config as fx_config

        # sizes that happen to be equal (S and the slab's length) are not assumed equal in later steps
        with fx_config.patch(use_duck_shape=False):
            return self._step_fn(B, S)

    def _graph(self, B: int, S: int):
        graph = self.graphs.get((B, S))
        if graph is None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up (the same inputs: it writes what the step writes)
                self._call(B, S)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                out = self._call(B, S)
            graph = self.graphs[(B, S)] = (g, out)
        return graph

    @torch.no_grad()
    def step(self, rows: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decoding step of ``rows``: ``tokens[i]`` goes into row ``rows[i]`` at rotary position ``positions[i]``.
        Returns the next-token logits ``[len(rows), V]`` (a copy: later steps do not change it)."""
        longest = max(self.length[r] for r in rows)
        if longest + 2 > self.size:  # a row would reach the scratch position: grow
            if not self.fits(longest + 1):
                raise RuntimeError(f"a row of {longest} entries is full (the slab holds {self.max_length - 2})")
            self._ensure(self.rows, longest + 1)
        B = min(self.rows, _pow2(max(rows) + 1))
        S = min(self.size, _pow2(longest + 1, self.MIN_LENGTH))
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's inputs have left the pinned buffer
        n = len(rows)
        fill = [[0] * B, [0] * B, [self.size - 1] * B, [0] * B]  # rows not stepping write to the scratch position
        for i, (r, token, position) in enumerate(zip(rows, tokens, positions)):
            fill[0][r], fill[1][r], fill[2][r] = token, position, self.length[r]
            fill[3][i] = r
        host = self.host[:, :B]
        host.copy_(torch.tensor(fill))
        self.inputs[:, :B].copy_(host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        out = None
        if self.cuda_graphs:
            try:
                graph, out = self._graph(B, S)
            except Exception as err:  # noqa: BLE001  a backbone that cannot be recorded still decodes, eagerly
                warnings.warn(
                    f"cacheaug: the decoding step could not be recorded as a CUDA graph "
                    f"({type(err).__name__}: {err}); decoding without CUDA graphs.",
                    stacklevel=2,
                )
                self.cuda_graphs, self.graphs, self.pool = False, {}, None
            else:
                graph.replay()
        if out is None:
            out = self._call(B, S)
        for r in rows:
            self.length[r] += 1
        self.steps += 1
        if rows == list(range(n)):
            return out[:n].clone()
        return out.index_select(0, self.inputs[3, :n])
