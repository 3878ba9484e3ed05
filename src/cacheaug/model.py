"""A frozen causal LM augmented by a trainable kv-cache coprocessor (arXiv 2412.17747).

Notable choices (where the paper is silent):

* Positions (default, ``position_scheme="shifted"``): after an insertion after token p the latents sit at
  p+1..p+N_L and the following real tokens continue at p+N_L+1.. . This is what plain HF decoding from the
  augmented cache does, so inference needs no position tricks and ``augment(...).cache`` is an ordinary
  ``DynamicCache``. The other schemes ("shared", "overlap") let the text keep its own positions; decoding then
  passes explicit ``position_ids`` (:meth:`CacheAugmentedLM.decode`, ``AugmentOutput.next_position``), and the
  masks still follow the order of the cache entries (as HF's own masks do).
* Loss: offset o = 1..N_A is the frozen decoder's cross-entropy on token p+o; the last latent predicts
  offset 1, ahead token p+o-1 (fed as input) predicts offset o. Only those rows go through the LM head.
* Training runs three passes: the frozen decoder over the text (no grad) gives
  the prefix K/V; the coprocessor reads it for all K traces at once; the frozen decoder reads
  ``[latents_k ; ahead tokens_k]`` for all K traces at once against the same prefix K/V. Masks: masks.py.
* Caches are built without a config, so sliding-window layers keep every token and the sliding window
  is applied by the mask (exactly equal to the model's own incremental decoding).
* Speed, same results: the prefix pass runs in two chunks with sdpa on sliding-window models (the first window
  unmasked, so sdpa's causal kernel skips the masked half); ``trace_groups`` > 1 (cacheaug.speed) draws the
  insertion points stratified and runs each group's passes against only the text keys it can see.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from . import kv, windows
from .arms import Arm, get_arm
from .config import CoprocessorConfig
from .coprocessor import Coprocessor
from .families import SLIDING, resolve_family
from .masks import attention_masks, group_key_lengths, groups_fitting, stratified_positions, trace_layout
from .sampling import SamplingParams, next_token

LOSS_CHUNK_ROWS = 2048  # rows of [*, vocab] logits alive at once in the loss


@dataclass
class CacheAugmentedOutput:
    """Result of the parallel multi-trace training pass.

    Attributes:
        loss: mean of ``token_losses`` (scalar, differentiable w.r.t. the coprocessor only).
        token_losses: ``[B, K, N_A]`` cross-entropy of token p_k + o at offset o (float32).
        positions: ``[B, K]`` insertion points p_k (given or sampled).
        latents: ``[B, K, N_L, D]`` latent embeddings written for each trace.
        base_token_losses: ``[B, K, N_A]`` the frozen decoder's own loss on the same tokens without
            latents (only with ``return_base_losses=True``); ``token_losses - base_token_losses`` is the gain.
    """

    loss: torch.Tensor
    token_losses: torch.Tensor
    positions: torch.Tensor
    latents: torch.Tensor
    base_token_losses: torch.Tensor | None = None


@dataclass
class AugmentOutput:
    """Result of :meth:`CacheAugmentedLM.augment`.

    Attributes:
        cache: a ``DynamicCache`` holding the prompt's K/V followed by the latents' K/V; the unmodified base
            model continues from it with its default positions.
        logits: ``[B, V]`` next-token logits after the latents (they predict the token after the prompt).
        latents: ``[B, N_L, D]`` the latent embeddings that were inserted.
        prompt_length: number of prompt tokens P (the cache holds P + N_L entries, + 1 with ``reread_last``).
        next_position: rotary position of the next token to decode from ``cache`` (pass it as ``position_ids``, or
            use :meth:`CacheAugmentedLM.decode`); equal to the cache length under the default "shifted" scheme.
        inserted: False when the gate (``CacheAugmentedLM.gate``) said no: then ``cache`` holds the prompt alone,
            ``logits`` are the frozen model's and ``latents`` is None.
    """

    cache: DynamicCache
    logits: torch.Tensor
    latents: torch.Tensor | None
    prompt_length: int
    next_position: int = -1
    inserted: bool = True


class CacheAugmentedLM(nn.Module):
    """Wraps an unmodified Hugging Face causal LM with a trainable kv-cache coprocessor.

    The base model's weights are frozen (``requires_grad=False``) and it is kept in eval mode; nothing else
    about it changes. Generation with ``augment=False``, with ``enabled = False`` or with a failing
    coprocessor is exactly the base model's.

    Args:
        base: a causal LM of a supported family (Gemma-2/3, Llama, Mistral, Qwen-2/3) loaded with
            attn_implementation ``sdpa``, ``eager`` or ``flex_attention``.
        config: the :class:`CoprocessorConfig` (defaults: N_L = N_A = K = 16, full-copy init).
        check_finite: raise on a non-finite training loss (costs one host sync per forward).

    >>> model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16))      # doctest: +SKIP
    >>> out = model(input_ids); out.loss.backward()                          # doctest: +SKIP
    >>> ids = model.generate(prompt_ids, max_new_tokens=64)                  # doctest: +SKIP
    """

    def __init__(
        self,
        base: nn.Module,
        config: CoprocessorConfig | None = None,
        *,
        check_finite: bool = True,
        _calibrate: bool = True,
    ):
        super().__init__()
        if not isinstance(base, nn.Module) or not hasattr(base, "get_decoder"):
            raise TypeError(f"`base` must be a Hugging Face causal LM (PreTrainedModel), got {type(base).__name__}.")
        self.family = resolve_family(base)
        self.config = config if config is not None else CoprocessorConfig()
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.coprocessor = self._build_trainable(_calibrate)
        self.enabled = True
        self.check_finite = check_finite
        self.recompute_loss = True  # recompute each loss chunk's logits in backward (memory); False keeps them (speed)
        self.trace_groups = 1  # > 1: stratified insertion points, each group's passes read only its text (speed)
        self.trace_chunk = 0  # > 0: the trace passes run C traces per row against a copy of the text keys (speed)
        self._trace_windows = False  # one trace per row, each layer reading only the keys it can see (speed)
        self._trace_kernel = False  # trace windows through cacheaug's kernel: text keys read in place (speed)
        self.compile_block_masks = False  # FlexAttention block masks built by a compiled create_block_mask (speed)
        self._compiled_pass = None
        self._compile_mode = None
        self.gate = None  # a fitted cacheaug.gate.Gate (loaded with its checkpoint): augment only where it fires
        self.gate_threshold: float | None = None  # None: the gate's own threshold

    @property
    def trace_windows(self) -> bool:
        """Speed option (cacheaug.windows): the trace passes run one trace per row, each layer reading only the text
        keys the trace can see. Setting it True checks the family and installs the attention function."""
        return self._trace_windows

    @trace_windows.setter
    def trace_windows(self, on: bool) -> None:
        if on:
            windows.check_family(self.family)
            windows.install()
        self._trace_windows = bool(on)

    @property
    def trace_kernel(self) -> bool:
        """Speed option (cacheaug.prefix_attention): trace windows whose attention reads the text keys in place (no
        per-row copies), skips the text tiles a row cannot see and computes no gradient for the text keys. Setting it
        True turns on ``trace_windows`` too. Triton kernels on CUDA; a torch reference elsewhere (same results)."""
        return self._trace_kernel and self._trace_windows

    @trace_kernel.setter
    def trace_kernel(self, on: bool) -> None:
        if on:
            self.trace_windows = True
        self._trace_kernel = bool(on)

    def compile_training(self, **compile_kwargs) -> "CacheAugmentedLM":
        """``torch.compile`` the training pass (all three passes and the loss, forward and backward) as one graph.

        Input checks and position sampling stay eager, so the compiled region has no host sync and no graph
        break; a fixed batch shape compiles once (``dynamic=False`` by default). Results equal the eager pass
        up to rounding. Only gradient-enabled calls use it (evaluation under ``no_grad`` stays eager). Keyword
        arguments go to ``torch.compile``; ``mode="reduce-overhead"`` also replays the step as CUDA graphs (the
        step's outputs are then overwritten by the next step: read them before calling again).
        """
        compile_kwargs.setdefault("dynamic", False)
        self._compile_mode = compile_kwargs.get("mode")
        self._compiled_pass = torch.compile(self._train_pass, **compile_kwargs)
        return self

    def _build_trainable(self, calibrate: bool) -> nn.Module:
        wants = self.arm.model_class or CacheAugmentedLM
        if not isinstance(self, wants):
            raise ValueError(
                f"init={self.config.init!r} is built by {wants.__module__}.{wants.__name__}: use it (or "
                "cacheaug.build_model, which picks the class from the arm)."
            )
        return Coprocessor(self.base, self.config, self.family, init_scale=calibrate)

    @property
    def arm(self) -> Arm:
        """The registry entry of ``config.init`` (cacheaug.arms)."""
        return get_arm(self.config.init)

    @property
    def scoring_lm(self) -> nn.Module:
        """The causal LM that scores text after the cache (the frozen decoder; the LoRA-decoder control: its adapted
        copy)."""
        return self.base

    # ------------------------------------------------------------------ housekeeping
    def train(self, mode: bool = True) -> "CacheAugmentedLM":
        super().train(mode)
        self.base.eval()  # the decoder is frozen: never dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The coprocessor's trainable parameters (including the soft tokens and the read-out scale)."""
        return [p for p in self.coprocessor.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors of the trainable parameters. Under FSDP2 this gathers shards: call it on every rank."""
        out = {}
        for name, p in self.coprocessor.named_parameters():
            if p.requires_grad:
                t = p.detach()
                out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
        return out

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    def cache_kwargs(self, cache: DynamicCache) -> dict:
        """Keyword arguments that make a call of the base model (or its decoder) read and extend ``cache``: the
        family's own name for the cache argument, and ``use_cache``."""
        return {self.family.cache_kwarg: cache, "use_cache": True}

    # ------------------------------------------------------------------ input checks
    def _check_ids(self, input_ids: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"`{what}` must be a LongTensor of token ids [batch, length], got {type(input_ids).__name__}."
            )
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"`{what}` must be an integer tensor [batch, length], got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}."
            )
        if input_ids.device != self.device:
            raise ValueError(
                f"`{what}` is on {input_ids.device} but the model is on {self.device}; move it with .to({str(self.device)!r})."
            )
        if input_ids.shape[1] == 0:
            raise ValueError(f"`{what}` is empty: at least one token is needed.")
        return input_ids.long()

    def _check_context(self, last_position: int, what: str) -> None:
        limit = self.family.max_positions
        if limit is not None and last_position >= limit:
            raise ValueError(
                f"{what} needs position {last_position}, beyond the model's context of {limit} positions "
                f"(max_position_embeddings); the {self.config.n_latents} latents take positions too. Shorten the input."
            )

    def _check_dtypes(self) -> None:
        cop = getattr(self.coprocessor, "soft_tokens", None)
        if cop is None:  # the LoRA-decoder control: no latents to check
            return
        dec = self.base.get_input_embeddings().weight
        if cop.device != dec.device:
            raise ValueError(
                f"The coprocessor is on {cop.device} but the decoder on {dec.device}; call model.to(device)."
            )
        if cop.dtype != dec.dtype and not torch.is_autocast_enabled(dec.device.type):
            raise ValueError(
                f"The coprocessor is {cop.dtype} but the decoder {dec.dtype}. Either run under "
                f"torch.autocast({dec.device.type!r}, dtype={dec.dtype}) (fp32 master weights), or cast the "
                f"coprocessor with model.coprocessor.to({dec.dtype})."
            )

    def _positions(self, positions, batch: int, length: int, generator: torch.Generator | None):
        """Checked insertion points ``[B, K]`` on the model's device and the trace-group count the pass can use
        with them (``self.trace_groups`` if they are stratified accordingly, else 1)."""
        n_ahead = self.config.n_ahead
        n_valid = length - n_ahead  # p in [0, T-1-N_A]: every trace has N_A target tokens
        if positions is None:
            k = self.config.n_traces
            if n_valid < k:
                raise ValueError(
                    f"Sequences of {length} tokens are too short for n_traces={k} insertion points with "
                    f"n_ahead={n_ahead} target tokens each: need at least {k + n_ahead} tokens. "
                    "Use longer sequences, fewer traces or fewer ahead tokens."
                )
            positions = stratified_positions(batch, n_valid, k, self.trace_groups, generator)  # [B, K] distinct, sorted
            return positions.to(self.device), self.trace_groups
        positions = torch.as_tensor(positions)  # checked where it lives: CPU positions cost no device sync
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"`positions` must be integer insertion points, got dtype {positions.dtype}.")
        if positions.dim() == 1:
            positions = positions[None].expand(batch, -1)
        if positions.dim() != 2 or positions.shape[0] != batch or positions.shape[1] == 0:
            raise ValueError(
                f"`positions` must have shape [K] or [batch={batch}, K] with K >= 1, got {tuple(positions.shape)}."
            )
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi > n_valid - 1:
            raise ValueError(
                f"Insertion points must lie in [0, T-1-n_ahead] = [0, {n_valid - 1}] so that each trace has "
                f"n_ahead={n_ahead} target tokens in a sequence of T={length}; got values in [{lo}, {hi}]."
            )
        groups = groups_fitting(positions, length, n_ahead, self.trace_groups)
        return positions.long().contiguous().to(self.device, non_blocking=True), groups

    # ------------------------------------------------------------------ training pass
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | list[int] | None = None,
        *,
        return_base_losses: bool = False,
        generator: torch.Generator | None = None,
    ) -> CacheAugmentedOutput:
        """Parallel multi-trace training pass (paper section 2.3) over packed sequences ``[B, T]``.

        Args:
            input_ids: ``[B, T]`` token ids (no padding).
            positions: insertion points p, ``[K]`` (shared) or ``[B, K]``; each in [0, T-1-N_A].
                None samples ``n_traces`` distinct points per sequence (returned in the output).
            return_base_losses: also return the frozen decoder's own losses on the same target tokens.
            generator: CPU generator for sampling positions.
        """
        ids = self._check_ids(input_ids, "input_ids")
        self._check_dtypes()
        B, T = ids.shape
        N_L = self.config.n_latents
        positions, groups = self._positions(positions, B, T, generator)  # [B, K]
        self._check_context(T - 1 + self.config.n_inserted, f"A sequence of {T} tokens with {N_L} latents")
        return self._run_pass(ids, positions, return_base_losses, groups)

    def _run_pass(
        self, ids: torch.Tensor, positions: torch.Tensor, return_base_losses: bool, groups: int = 1
    ) -> CacheAugmentedOutput:
        compiled = self._compiled_pass is not None and torch.is_grad_enabled()
        if compiled and self._compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous replay's outputs may be reused
        train_pass = self._compiled_pass if compiled else self._train_pass
        token_losses, latents, base_losses = train_pass(ids, positions, return_base_losses, groups)
        loss = token_losses.mean() if self.config.offset_decay == 1 else (token_losses * self._offset_weights()).mean()
        if self.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}). Lower the learning rate, clip gradients, or keep "
                "fp32 master weights under bf16 autocast."
            )
        return CacheAugmentedOutput(loss, token_losses, positions, latents, base_losses)

    def _offset_weights(self) -> torch.Tensor:
        """``[N_A]`` loss weights, decay**(o-1) normalised to mean 1 (``config.offset_decay``)."""
        w = self.config.offset_decay ** torch.arange(self.config.n_ahead, device=self.device, dtype=torch.float32)
        return w / w.mean()

    def _train_pass(self, ids: torch.Tensor, positions: torch.Tensor, return_base_losses: bool, groups: int = 1):
        """The three passes and the loss on checked inputs: tensor code only (no host sync), so ``torch.compile``
        captures it in one graph (:meth:`compile_training`). Returns ``(token_losses, latents, base_losses or
        None)``."""
        h, latents, h_base, targets = self._target_states(ids, positions, return_base_losses, groups)
        token_losses = self._token_losses(h, targets)  # [B, K, N_A]
        base_losses = None
        if h_base is not None:
            with torch.no_grad():
                base_losses = self._token_losses(h_base, targets)
        return token_losses, latents, base_losses

    def _target_states(self, ids: torch.Tensor, positions: torch.Tensor, with_base: bool, groups: int = 1):
        """The decoder's hidden states that predict the N_A targets of every trace, ``[B, K, N_A, D]``, the latents
        ``[B, K, N_L, D]``, the frozen decoder's own states for the same targets (without latents; ``with_base``)
        and the targets ``[B, K, N_A]``. With ``groups`` > 1 the traces of group g (slots g*K/G ..) run the
        coprocessor and decoder passes against the first S_g text keys only (masks.py, "trace groups"); the
        caller has checked that their insertion points lie there."""
        B, T = ids.shape
        K = positions.shape[1]
        N_A = self.config.n_ahead

        # (a) frozen decoder over the text: the shared prefix K/V of every trace
        with torch.no_grad():
            h_text, prefix_kv = self._prefix_pass(ids)  # [B, T, D], [B, H_kv, T, D_h] per layer

        # (b) coprocessor and (c) decoder over the traces, one call each per trace group
        key_lengths = group_key_lengths(T, N_A, groups) if groups > 1 else [T]
        per = K // len(key_lengths)
        latents, h = [], []
        for g, S in enumerate(key_lengths):
            kv = prefix_kv if S == T else [(k[:, :, :S], v[:, :, :S]) for k, v in prefix_kv]
            lat_g, h_g = self._traces(ids, kv, positions[:, g * per : (g + 1) * per])
            latents.append(lat_g)
            h.append(h_g)
        latents, h = torch.cat(latents, dim=1), torch.cat(h, dim=1)  # [B, K, N_L, D], [B, K, N_A, D]
        D = h.shape[-1]

        offsets = torch.arange(1, N_A + 1, device=ids.device)
        targets = ids.gather(1, (positions[:, :, None] + offsets).view(B, -1)).view(B, K, N_A)
        h_base = None
        if with_base:
            rows = (positions[:, :, None] + offsets - 1).view(B, -1)  # token p+o-1 predicts p+o
            h_base = h_text.gather(1, rows[:, :, None].expand(-1, -1, D)).view(B, K, N_A, D)
        return h, latents, h_base, targets

    @torch.no_grad()
    def score_targets(self, input_ids: torch.Tensor, positions) -> dict:
        """Evaluation of explicit insertion points ``[K]`` or ``[B, K]`` in one parallel pass: per trace and offset
        the augmented loss and whether the augmented model's top token is the target (``hits``: greedy decoding
        reproduces a span of targets exactly iff every hit in it is true), and the same for the frozen decoder
        (``base_losses``, ``base_hits``); each ``[B, K, N_A]``. Equal to ``augment`` then plain decoding."""
        ids = self._check_ids(input_ids, "input_ids")
        self._check_dtypes()
        positions, _ = self._positions(positions, *ids.shape, None)
        h, _, h_base, targets = self._target_states(ids, positions, True)
        out = {}
        for name, states in (("", h), ("base_", h_base)):
            out[f"{name}losses"], out[f"{name}hits"] = self._token_scores(states, targets)
        return out

    def _prefix_pass(self, ids: torch.Tensor):
        """The frozen decoder over the text: its last hidden states ``[B, T, D]`` and per-layer ``(keys, values)``.

        With sdpa and sliding-window layers (window W < T) the text goes in two chunks: the first W tokens with no
        mask at all (within W tokens a sliding layer is plainly causal, so every layer takes sdpa's causal kernel,
        which skips the masked half), then the rest against the cache with the causal and sliding masks. The dense
        masks transformers would build otherwise (always, while compiling) make every layer compute all T x T."""
        decoder = self.base.get_decoder()
        cache = DynamicCache()
        T, W = ids.shape[1], self.family.sliding_window
        if self.family.attn_implementation != "sdpa" or not self.family.dict_masks or W is None or W >= T:
            h = decoder(input_ids=ids, **self.cache_kwargs(cache)).last_hidden_state
        else:
            none = {layer_type: None for layer_type in self.family.mask_types}
            h_first = decoder(input_ids=ids[:, :W], attention_mask=none, **self.cache_kwargs(cache)).last_hidden_state
            q = torch.arange(W, T, device=ids.device)[:, None]
            kv = torch.arange(T, device=ids.device)
            masks = {
                layer_type: (kv <= q) & ((q - kv < W) if layer_type == SLIDING else True)
                for layer_type in self.family.mask_types
            }  # [T-W, T] each, True = attend
            h_rest = decoder(
                input_ids=ids[:, W:],
                position_ids=q.T.expand(ids.shape[0], -1),
                attention_mask={k: m[None, None].expand(ids.shape[0], 1, -1, -1) for k, m in masks.items()},
                **self.cache_kwargs(cache),
            ).last_hidden_state
            h = torch.cat([h_first, h_rest], dim=1)
        return h, [(layer.keys, layer.values) for layer in cache.layers]

    def _traces(self, ids: torch.Tensor, prefix_kv: list, positions: torch.Tensor):
        """Passes (b) and (c) for traces at ``positions`` ``[B, K]`` reading the S text keys of ``prefix_kv``.
        Returns the latents ``[B, K, N_L, D]`` and the decoder's hidden states that predict the targets
        ``[B, K, N_A, D]`` (last latent, or token p read again with ``reread_last``; then the ahead tokens).

        With ``self.trace_chunk`` = C < K (speed option, cacheaug.speed) the K traces of a sequence run as K/C rows
        of C traces each, every row against its own copy of the text keys: a trace's queries then meet the text and
        the C blocks of its row, not all K blocks (the other blocks are masked for it anyway), at the cost of copying
        the text keys K/C times. With ``self.trace_windows`` (cacheaug.windows) each trace is a row of its own on
        sliding-window layers, reading only the keys it can see, and full layers run C traces per row. Same masks,
        same results."""
        B, K = positions.shape
        C = self.trace_chunk
        if self.trace_windows:
            return self._traces_packed(ids, prefix_kv, positions, windowed=True)
        if 0 < C < K and K % C == 0:  # (other K, e.g. an evaluation's: packed, with the same results)
            n = K // C
            rows_kv = [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in prefix_kv]
            latents, h = self._traces_packed(ids.repeat_interleave(n, dim=0), rows_kv, positions.reshape(B * n, C))
            return latents.reshape(B, K, *latents.shape[2:]), h.reshape(B, K, *h.shape[2:])
        return self._traces_packed(ids, prefix_kv, positions)

    def _traces_packed(self, ids: torch.Tensor, prefix_kv: list, positions: torch.Tensor, windowed: bool = False):
        """:meth:`_traces` with the K traces of a sequence packed in one row (the blocks after the text keys), or
        with ``windowed`` one trace per row, each layer gathering the text keys the trace can see (cacheaug.windows)."""
        B, K = positions.shape
        N_L, N_A, R = self.config.n_latents, self.config.n_ahead, int(self.config.reread_last)
        embed = self.base.get_input_embeddings()
        dtype = embed.weight.dtype

        latents = self._latents(ids, prefix_kv, positions, windowed)  # (b) [B, K, N_L, D]
        D = latents.shape[-1]

        # (c) frozen decoder over [latents_k ; (token p_k) ; tokens p_k+1 .. p_k+N_A-1], gradients flow to the latents
        L = N_L + R + N_A - 1
        text = positions[:, :, None] + torch.arange(1 - R, N_A, device=ids.device)  # [B, K, R + N_A - 1]
        ahead = ids.gather(1, text.view(B, -1))
        x = torch.cat([latents.to(dtype), embed(ahead).view(B, K, R + N_A - 1, D)], dim=2)  # [B, K, L, D]
        rows = (B * K, L) if windowed else (B, K * L)
        masks, cache = self._pass_keys(prefix_kv, positions, L, windowed)
        h = self.base.get_decoder()(
            inputs_embeds=x.view(*rows, D),
            position_ids=self._block_positions(positions, L).view(rows),
            attention_mask=masks,
            **cache,
        ).last_hidden_state  # [B, K*L, D] or [B*K, L, D]
        return latents, h.view(B, K, L, D)[:, :, N_L + R - 1 :]

    def _pass_keys(self, prefix_kv: list, positions: torch.Tensor, block_len: int, windowed: bool):
        """The masks and cache keywords of a pass of blocks of ``block_len`` reading the text keys ``prefix_kv``: packed
        (one dense mask over text and blocks, the text as a cache) or trace windows (per-row keys, no cache)."""
        if windowed:
            groups = self.base.config.num_attention_heads // self.base.config.num_key_value_heads
            C, K = self.trace_chunk, positions.shape[1]
            full_chunk = C if 0 < C <= K and K % C == 0 else 1  # full-attention layers: C traces per row
            return (
                windows.trace_keys(prefix_kv, positions, block_len, self.family, groups, full_chunk, self.trace_kernel),
                {"use_cache": False},
            )
        layout = trace_layout(positions, prefix_kv[0][0].shape[2], block_len)
        dtype = self.base.get_input_embeddings().weight.dtype
        return (
            attention_masks(layout, self.family, dtype, self.compile_block_masks),
            self.cache_kwargs(kv.from_layers(prefix_kv)),
        )

    def _block_positions(self, positions: torch.Tensor, block_len: int) -> torch.Tensor:
        """Rotary positions ``[B, K*L]`` of the decoder blocks under ``config.position_scheme``. The "shifted"
        scheme's are the blocks' own positions in their virtual sequences (p_k + 1 + i, which the masks use)."""
        B, K = positions.shape
        N_L, N_A, R = self.config.n_latents, self.config.n_ahead, int(self.config.reread_last)
        device = positions.device
        scheme = self.config.position_scheme
        if scheme == "shifted":
            rel = torch.arange(1, block_len + 1, device=device)
        else:
            lat = (
                torch.zeros(N_L, dtype=torch.long, device=device)
                if scheme == "shared"
                else torch.arange(1, N_L + 1, device=device)
            )  # overlap
            rel = torch.cat([lat, torch.arange(1 - R, N_A, device=device)])  # token p+j keeps position p+j
        return (positions[:, :, None] + rel).view(B, K * rel.numel())

    def _latents(self, ids: torch.Tensor, prefix_kv: list, positions: torch.Tensor, windowed: bool = False):
        """(b) the coprocessor over K blocks of N_L soft tokens, block k reading text <= p_k: ``[B, K, N_L, D]``
        (``windowed``: one trace per row, cacheaug.windows)."""
        B, K = positions.shape
        N_L = self.config.n_latents
        rows = (B * K, 1) if windowed else (B, K)
        q_pos = (positions[:, :, None] + torch.arange(1, N_L + 1, device=positions.device)).view(*rows[:1], -1)
        masks = (
            None if self.coprocessor.backbone is None else self._pass_keys(prefix_kv, positions, N_L, windowed)[0]
        )  # (the coprocessor builds its own cache)
        echo = self.base.get_input_embeddings()(ids.gather(1, positions)) if self.config.echo_residual else None
        latents = self.coprocessor(
            None if windowed else prefix_kv, *rows, q_pos, masks, None if echo is None else echo.view(*rows, -1)
        )  # [B, K*N_L, D] or [B*K, N_L, D]
        return latents.view(B, K, N_L, latents.shape[-1])

    def _token_scores(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: cross-entropy (float32) and whether the top token is the target (bool) for ``hidden``
        ``[..., D]``, from one LM-head product per chunk of LOSS_CHUNK_ROWS rows."""
        head, cap = self.base.get_output_embeddings(), self.family.final_logit_softcap
        h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        losses, hits = [], []
        for i in range(0, h2.shape[0], LOSS_CHUNK_ROWS):
            logits, t = head(h2[i : i + LOSS_CHUNK_ROWS]).float(), t1[i : i + LOSS_CHUNK_ROWS]
            if cap:
                logits = cap * torch.tanh(logits / cap)
            losses.append(F.cross_entropy(logits, t, reduction="none"))
            hits.append(logits.argmax(-1) == t)
        return torch.cat(losses).view(targets.shape), torch.cat(hits).view(targets.shape)

    def _token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (float32) of the LM head on ``hidden`` ``[..., D]`` only, in row chunks.

        With ``self.recompute_loss`` (default) each chunk is recomputed in backward (activation checkpointing),
        so at most LOSS_CHUNK_ROWS rows of full-vocabulary logits exist at once; without it the logits are kept
        for backward (one LM-head product less per step, ``rows x vocab`` more memory).
        """
        head = self.base.get_output_embeddings()
        cap = self.family.final_logit_softcap

        def ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = head(h).float()
            if cap:
                logits = cap * torch.tanh(logits / cap)
            return F.cross_entropy(logits, t, reduction="none")

        h2, t1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        grad = torch.is_grad_enabled() and h2.requires_grad and self.recompute_loss
        out = [
            checkpoint(ce, h2[i : i + LOSS_CHUNK_ROWS], t1[i : i + LOSS_CHUNK_ROWS], use_reentrant=False)
            if grad
            else ce(h2[i : i + LOSS_CHUNK_ROWS], t1[i : i + LOSS_CHUNK_ROWS])
            for i in range(0, h2.shape[0], LOSS_CHUNK_ROWS)
        ]
        return torch.cat(out).view(targets.shape)

    # ------------------------------------------------------------------ the gate (cacheaug.gate)
    def gated(self, use_gate: bool | None = None) -> bool:
        """Whether the gate decides (``use_gate`` None: whenever a gate is loaded)."""
        if use_gate and self.gate is None:
            raise ValueError(
                "this coprocessor has no gate: fit one with `cacheaug train-gate --checkpoint CKPT --data "
                "...`, or augment without it"
            )
        return self.gate is not None and use_gate is not False

    @torch.no_grad()
    def gate_states(self, input_ids: torch.Tensor, positions) -> torch.Tensor:
        """The frozen decoder's last hidden states at ``positions`` ``[K]`` or ``[B, K]`` of ``input_ids`` ``[B, T]``:
        ``[B, K, D]``, what the gate reads there (the same states ``augment`` reads at a prompt's last token)."""
        ids = self._check_ids(input_ids, "input_ids")
        positions = torch.as_tensor(positions, device=self.device).long()
        if positions.dim() == 1:
            positions = positions[None].expand(ids.shape[0], -1)
        h, _ = self._prefix_pass(ids)
        return h.gather(1, positions[:, :, None].expand(-1, -1, h.shape[-1]))

    @torch.no_grad()
    def gate_probs(self, input_ids: torch.Tensor, positions) -> torch.Tensor:
        """``[B, K]`` the gate's probability that augmenting after each of ``positions`` pays (needs a gate)."""
        self.gated(True)
        return self.gate(self.gate_states(input_ids, positions))

    def gate_fires(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the gate's decision for the decoder's last hidden states ``hidden`` ``[..., D]``."""
        return self.gate.fires(hidden, self.gate_threshold)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen LM head (with the family's final soft-cap) on hidden states ``[B, D]``: next-token logits."""
        logits = self.base.get_output_embeddings()(hidden[:, None])[:, 0]  # [B, 1, D]: as the model's own last row
        cap = self.family.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # ------------------------------------------------------------------ inference
    def _check_cache(self, cache, prompt_len: int, batch: int) -> DynamicCache:
        cfg = self.base.config
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != cfg.num_hidden_layers:
            raise ValueError(
                f"`past_key_values` must be a transformers Cache with {cfg.num_hidden_layers} layers for this model, "
                f"got {type(cache).__name__} with {None if layers is None else len(layers)} layers."
            )
        for i, layer in enumerate(layers):
            k = getattr(layer, "keys", None)
            if k is None or k.dim() != 4 or k.shape[0] != batch or k.shape[2] != prompt_len:
                raise ValueError(
                    f"`past_key_values` layer {i} does not hold the prompt's {prompt_len} positions for batch {batch} "
                    f"(keys {None if k is None else tuple(k.shape)}). Pass the cache of exactly this prompt, built "
                    "with DynamicCache() without a config so sliding-window layers keep every token."
                )
            expected_heads = getattr(cfg, "num_key_value_heads", None)
            if expected_heads is not None and k.shape[1] != expected_heads:
                raise ValueError(
                    f"`past_key_values` layer {i} has {k.shape[1]} kv heads but this model has {expected_heads}: "
                    "the cache belongs to another model."
                )
            if k.device != self.device:
                raise ValueError(f"`past_key_values` is on {k.device}, the model on {self.device}.")
        return kv.fork(cache)

    @torch.no_grad()
    def compute_latents(
        self, cache: DynamicCache, length: int | None = None, last_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The coprocessor's latents ``[B, N_L, D]`` for the first ``length`` positions of a decoder ``cache``
        (all of them by default). The cache is only read; latents can be computed ahead or on another worker
        and inserted later with :meth:`insert_latents`. ``last_token`` ``[B]``: the id of the token at position
        ``length - 1`` (needed with ``echo_residual``)."""
        prefix_kv = kv.layers(kv.fork(cache, length))
        echo = None
        if self.config.echo_residual:
            if last_token is None:
                raise ValueError(
                    "This coprocessor (echo_residual) needs `last_token`, the id of the prefix's last token."
                )
            echo = self.base.get_input_embeddings()(torch.as_tensor(last_token, device=self.device).view(-1, 1))
        return self.coprocessor(prefix_kv, prefix_kv[0][0].shape[0], echo=echo)  # default positions: length..

    @torch.no_grad()
    def compute_latents_batch(
        self,
        prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]],
        lengths: list[int],
        last_tokens: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """The latents of several prefixes (each a batch-1 cache's ``(keys, values)`` per layer, ``lengths``
        positions) in one coprocessor call, left-padded and masked: one ``[1, N_L, D]`` each, equal to
        :meth:`compute_latents` on each prefix alone. ``last_tokens``: each prefix's last token id (needed with
        ``echo_residual``)."""
        n_latents = self.config.n_latents
        padded, mask = kv.left_pad(prefixes, lengths, n_latents)
        positions = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(n_latents, device=self.device)
        echo = None
        if self.config.echo_residual:
            if last_tokens is None:
                raise ValueError("This coprocessor (echo_residual) needs `last_tokens`, each prefix's last token id.")
            echo = self.base.get_input_embeddings()(torch.tensor(last_tokens, device=self.device)[:, None])
        latents = self.coprocessor(padded, len(prefixes), 1, positions, mask, echo)  # [B, N_L, D]
        return [latents[i : i + 1] for i in range(len(prefixes))]

    def next_position(self, cache_length: int, augmented: bool = True) -> int:
        """Rotary position of the next token decoded from a cache of ``cache_length`` entries (augmented or not)."""
        return cache_length - (self.config.position_shift if augmented else 0)

    def decode(self, cache: DynamicCache, input_ids: torch.Tensor, position: int, **kwargs):
        """The frozen decoder over ``input_ids`` ``[B, n]`` continuing ``cache``, the first at rotary ``position``
        (:meth:`next_position`; e.g. ``AugmentOutput.next_position``). Returns the base model's output."""
        n = input_ids.shape[1]
        pos = torch.arange(position, position + n, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        return self.base(input_ids=input_ids, position_ids=pos, **self.cache_kwargs(cache), **kwargs)

    @torch.no_grad()
    def insert_latents(
        self,
        cache: DynamicCache,
        latents: torch.Tensor,
        last_token: torch.Tensor | None = None,
        then: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``latents`` to ``cache`` (which holds exactly the prompt, P entries) through the frozen decoder;
        returns the next-token logits ``[B, V]``. ``last_token`` ``[B]``: the prompt's last token id, read again
        after the latents with ``reread_last``. ``then`` ``[B, n]``: tokens to decode after the latents in the same
        pass (a late insertion's replay: one decoder call instead of two); the logits are then those after the last
        of them."""
        x, P = self._insertion_inputs(latents, last_token, then), cache.get_seq_length()
        pos = None
        if self.config.position_scheme != "shifted":  # the default positions (the cache's own) are the shifted ones
            n = 0 if then is None else then.shape[1]
            pos = torch.tensor([self._insertion_positions(P, latents.shape[1], n)], device=self.device)
            pos = pos.expand(x.shape[0], -1)
        out = self.base(inputs_embeds=x, position_ids=pos, logits_to_keep=1, **self.cache_kwargs(cache))
        return out.logits[:, -1]

    @torch.no_grad()
    def insert_latents_rows(
        self,
        caches: list[DynamicCache],
        latents: torch.Tensor,
        last_tokens: torch.Tensor | None = None,
        then: torch.Tensor | None = None,
    ) -> tuple[list[DynamicCache], torch.Tensor]:
        """:meth:`insert_latents` for several prompts of different lengths in one decoder call (serving: the requests
        whose latents arrived together). ``caches``: one batch-1 cache per row, each holding exactly its prompt (left
        unchanged); ``latents`` ``[G, N_L, D]``; ``last_tokens`` ``[G]``; ``then`` ``[G, n]`` (the same number of
        tokens replayed in every row). The caches are left-padded to the longest, which keeps every row's
        query-to-key distances (sliding windows mask as unbatched), and each row is at its own positions. Returns one
        new cache per row (its prompt, the latents, then its tokens) and the next-token logits ``[G, V]``."""
        if len(caches) != latents.shape[0]:
            raise ValueError(f"{len(caches)} caches for {latents.shape[0]} rows of latents")
        x = self._insertion_inputs(latents, last_tokens, then)
        lengths, m = [kv.length(c) for c in caches], x.shape[1]
        n = 0 if then is None else then.shape[1]
        padded, mask = kv.left_pad([kv.layers(c) for c in caches], lengths, m)
        batch = kv.from_layers(padded)
        pos = torch.tensor([self._insertion_positions(P, latents.shape[1], n) for P in lengths], device=self.device)
        out = self.base(
            inputs_embeds=x, position_ids=pos, attention_mask=mask, logits_to_keep=1, **self.cache_kwargs(batch)
        )
        return kv.unpad_rows(batch, [P + m for P in lengths]), out.logits[:, -1]

    def _insertion_inputs(self, latents: torch.Tensor, last_token, then) -> torch.Tensor:
        """The decoder's input embeddings for an insertion: the latents, the prompt's last token again with
        ``reread_last``, then the tokens replayed (``then``)."""
        embed = self.base.get_input_embeddings()
        x, B = latents.to(embed.weight.dtype), latents.shape[0]
        if self.config.reread_last:
            if last_token is None:
                raise ValueError(
                    "This coprocessor (reread_last) needs `last_token`, the id of the prompt's last token."
                )
            token = torch.as_tensor(last_token, device=self.device).view(-1, 1).expand(B, 1)
            x = torch.cat([x, embed(token)], dim=1)
        if then is not None and then.shape[1]:
            x = torch.cat([x, embed(then.to(self.device))], dim=1)
        return x

    def _insertion_positions(self, P: int, n_latents: int, n: int) -> list[int]:
        """Rotary positions of an insertion's inputs after a prompt of ``P`` tokens: ``n_latents`` latents, the
        reread token, ``n`` replayed tokens."""
        cfg = self.config
        m = n_latents + int(cfg.reread_last) + n
        if cfg.position_scheme == "shifted":  # everything at its cache index
            return list(range(P, P + m))
        lat = [P - 1] * n_latents if cfg.position_scheme == "shared" else list(range(P, P + n_latents))
        start = self.next_position(P + cfg.n_inserted)  # token p = P - 1 keeps its position; the text goes on here
        return lat + [P - 1] * int(cfg.reread_last) + list(range(start, start + n))

    @torch.no_grad()
    def augment(
        self, prompt_ids: torch.Tensor, past_key_values=None, *, stale_by: int = 0, use_gate: bool | None = None
    ) -> AugmentOutput:
        """Run the coprocessor once at the end of ``prompt_ids`` ``[B, P]`` and insert its latents.

        Args:
            prompt_ids: the prompt (no padding; equal lengths across the batch).
            past_key_values: optionally the decoder's cache of exactly this prompt (e.g. stored offline);
                it is not modified.
            stale_by: compute the latents from the first P - stale_by tokens only, as if they had been
                computed that many tokens earlier and arrived late (the staleness study; asynchronous serving).
                They are still inserted after the whole prompt.
            use_gate: let the gate (``self.gate``, fitted by ``cacheaug train-gate``) decide whether to insert;
                None (default): whenever there is one. Where it says no, the output is the frozen model's
                (``inserted=False``); a batch whose rows it decides differently is refused (augment them apart, or
                use :meth:`generate`, which splits them).

        Returns an :class:`AugmentOutput` whose ``cache`` (prompt + latents) the unmodified base model decodes
        from, the next token at rotary position ``next_position`` (with the default "shifted" scheme that is the
        cache length, i.e. plain HF decoding with default positions).
        """
        ids = self._check_ids(prompt_ids, "prompt_ids")
        self._check_dtypes()
        B, P = ids.shape
        if not isinstance(stale_by, int) or not 0 <= stale_by < P:
            raise ValueError(
                f"`stale_by` must be an integer in [0, {P - 1}] for a prompt of {P} tokens, got {stale_by!r}."
            )
        self._check_context(
            P - 1 + self.config.n_inserted, f"A prompt of {P} tokens with {self.config.n_latents} latents"
        )
        if past_key_values is None:
            cache = DynamicCache()
            h = self.base.get_decoder()(input_ids=ids, **self.cache_kwargs(cache)).last_hidden_state[:, -1]
        else:
            cache = self._check_cache(past_key_values, P, B)
            h = None
        if self.gated(use_gate):
            if h is None:  # the state at the prompt's last token, from the stored cache of the tokens before it
                h = self.base.get_decoder()(
                    input_ids=ids[:, -1:],
                    position_ids=torch.full((B, 1), P - 1, device=self.device),
                    **self.cache_kwargs(kv.fork(cache, P - 1)),
                ).last_hidden_state[:, -1]
            fire = self.gate_fires(h)
            if not fire.any():
                return AugmentOutput(
                    cache=cache,
                    logits=self._head_logits(h),
                    latents=None,
                    prompt_length=P,
                    next_position=P,
                    inserted=False,
                )
            if not fire.all():
                raise ValueError(
                    f"the gate augments rows {fire.nonzero()[:, 0].tolist()} of this batch and not the "
                    "others: augment the rows apart, or use generate(), which splits them"
                )
        latents = self.compute_latents(cache, P - stale_by, ids[:, P - 1 - stale_by])  # [B, N_L, D]
        logits = self.insert_latents(cache, latents, ids[:, P - 1])
        return AugmentOutput(
            cache=cache,
            logits=logits,
            latents=latents,
            prompt_length=P,
            next_position=self.next_position(cache.get_seq_length()),
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        augment: bool = True,
        use_gate: bool | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode ``max_new_tokens`` after ``prompt_ids`` ``[B, P]``; returns ``[B, P + new]`` like HF ``generate``.

        With ``augment=True`` the coprocessor runs once at the end of the prompt and the base model decodes
        from the augmented cache. With ``augment=False``, ``enabled = False``, or when the coprocessor raises
        (a warning says so), this is exactly ``base.generate``. With a gate (``self.gate``; ``use_gate`` None: whenever
        there is one) each row is augmented only where the gate fires at its prompt's end; the other rows are
        exactly ``base.generate`` (rows of a batch the gate decides differently are decoded apart and padded, as
        ``base.generate`` pads rows that ended early).
        """
        ids = self._check_ids(prompt_ids, "prompt_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
        gen = self.base.generation_config
        eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        hf_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            hf_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_token_id is not None:
            hf_kwargs["eos_token_id"] = eos_token_id
        if pad_token_id is not None:
            hf_kwargs["pad_token_id"] = pad_token_id
        if not augment or not self.enabled:
            return self.base.generate(ids, **hf_kwargs)
        if self.gated(use_gate):
            with torch.no_grad():
                fire = self.gate_fires(self.base.get_decoder()(input_ids=ids).last_hidden_state[:, -1])
            if not fire.any():
                return self.base.generate(ids, **hf_kwargs)
            if not fire.all():
                kw = dict(
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    generator=generator,
                )
                parts = {
                    True: self.generate(ids[fire], use_gate=False, **kw),
                    False: self.base.generate(ids[~fire], **hf_kwargs),
                }
                width = max(t.shape[1] for t in parts.values())
                fill = pad if pad is not None else (eos if isinstance(eos, int) else (list(eos or [0]) or [0])[0])
                out = torch.full((ids.shape[0], width), int(fill), dtype=ids.dtype, device=ids.device)
                for flag, t in parts.items():
                    out[(fire if flag else ~fire).nonzero()[:, 0], : t.shape[1]] = t
                return out
        self._check_context(ids.shape[1] + self.config.n_inserted + max_new_tokens - 1, "Generation")
        try:
            aug = self.augment(ids, use_gate=False)
        except Exception as err:  # the decoder must keep working when the coprocessor fails
            warnings.warn(
                f"Coprocessor failed ({type(err).__name__}: {err}); decoding without augmentation.", stacklevel=2
            )
            return self.base.generate(ids, **hf_kwargs)

        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=ids.device)
        if pad is None:
            pad = int(eos_ids[0]) if len(eos_ids) else 0
        params = SamplingParams(max(temperature, 1e-5), top_k, top_p) if do_sample else SamplingParams()
        logits, cache, position = aug.logits, aug.cache, aug.next_position
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for step in range(max_new_tokens):
            token = next_token(logits, params, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new.append(token)
            finished |= torch.isin(token, eos_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self.decode(cache, token[:, None], position + step, logits_to_keep=1).logits[:, -1]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``coprocessor_config.json`` and ``model.safetensors`` (trainable weights only) to ``path``.

        ``tensors``: an already gathered :meth:`trainable_state_dict` (sharded training gathers on every rank
        and writes on one)."""
        from .checkpoint import save_coprocessor

        return save_coprocessor(self, path, tensors)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, base: nn.Module, *, check_base: bool = True, check_finite: bool = True
    ) -> "CacheAugmentedLM":
        """Load a coprocessor saved by :meth:`save_pretrained` onto ``base``.

        The base model must be the one it was trained with (compared by a fingerprint of its weights);
        ``check_base=False`` skips that check.
        """
        from .checkpoint import load_coprocessor

        return load_coprocessor(cls, path, base, check_base=check_base, check_finite=check_finite)


def build_model(base, config, **kwargs):
    """The model for ``config.init``'s arm (a coprocessor, pause tokens, the LoRA-decoder control, ...)."""
    return (get_arm(config.init).model_class or CacheAugmentedLM)(base, config, **kwargs)
