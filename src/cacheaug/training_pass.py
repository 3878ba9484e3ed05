"""The parallel multi-trace training pass of :class:`~cacheaug.model.CacheAugmentedLM` (paper section 2.3): the frozen
decoder over the text, the coprocessor over K blocks of latents, the frozen decoder over the K traces, the chunked
loss; and scoring explicit insertion points. A mixin: the model class holds the state (config, base, coprocessor,
speed options) and the input checks; model.py's docstring has the choices made where the paper is silent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from . import kv, windows
from .families import SLIDING
from .masks import attention_masks, group_key_lengths, trace_layout

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


class TrainingPass:
    """``forward`` (the training pass), ``score_targets`` and the passes they are made of."""

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
